//! The window, driven like a person would: `egui_kittest` clicks widgets by their accessible
//! names and types into fields, headless (no window, no GPU), against a real inference worker
//! running tiny random-weight GPT-2 models written by `studio-tests`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use studio_app::gui::conversations::{Conversation, ReplyState};
use studio_app::gui::{AppConfig, Command, Panel, StudioApp};
use studio_inference::chat::{ChatMessage, Role as ChatRole, render_plain};
use studio_tests::{TinyGpt2, write_gpt2_readable};

const TIMEOUT: Duration = Duration::from_secs(20);

fn harness(home: &Path) -> Harness<'static, StudioApp> {
    let app = StudioApp::new(&egui::Context::default(), &AppConfig::for_tests(home));
    Harness::builder()
        .with_size(egui::vec2(1280.0, 860.0))
        .build_ui_state(
            |ui, app: &mut StudioApp| {
                app.frame_logic(ui.ctx());
                app.root_ui(ui);
            },
            app,
        )
}

/// Steps frames (with short sleeps for the worker) until `done` holds; fails after [`TIMEOUT`].
#[track_caller]
fn step_until(
    h: &mut Harness<'_, StudioApp>,
    what: &str,
    done: impl Fn(&Harness<'_, StudioApp>) -> bool,
) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        h.step();
        if done(h) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a widget other than plain text has this exact name (navigation, buttons).
fn control<'a>(h: &'a Harness<'_, StudioApp>, name: &'a str) -> egui_kittest::Node<'a> {
    h.get_all_by(move |n| n.role() != Role::Label && n.label().as_deref() == Some(name))
        .next()
        .unwrap_or_else(|| panic!("no control named {name}"))
}

/// Whether some node's name or value (label text, a combo box's choice) contains `text`.
fn shows_text(h: &Harness<'_, StudioApp>, text: &str) -> bool {
    h.query_all_by(move |n| {
        n.label().is_some_and(|l| l.contains(text)) || n.value().is_some_and(|v| v.contains(text))
    })
    .next()
    .is_some()
}

fn go_to(h: &mut Harness<'_, StudioApp>, panel: Panel) {
    control(h, panel.label()).click();
    h.step();
    h.step();
    assert_eq!(h.state().settings().panel, panel);
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("gpt2-tiny-readable");
    write_gpt2_readable(&model, TinyGpt2::default(), 7);
    model
}

/// Loads through the Models panel: type the path, click Load.
fn load_through_models_panel(h: &mut Harness<'_, StudioApp>, model: &Path) {
    go_to(h, Panel::Models);
    h.get_by_label("Model path").focus();
    h.step();
    h.get_by_label("Model path")
        .type_text(&model.display().to_string());
    h.step();
    control(h, "Load").click();
    step_until(h, "the model to load", |h| h.state().model().is_some());
    h.step();
}

fn send(h: &mut Harness<'_, StudioApp>, text: &str) {
    h.get_by_label("Message").focus();
    h.step();
    h.get_by_label("Message").type_text(text);
    // A long message grows the box over a few frames: click once the button stays put.
    let mut last = None;
    let mut same = 0;
    for _ in 0..60 {
        h.step();
        let rect = control(h, "Send").rect();
        same = if last == Some(rect) { same + 1 } else { 0 };
        if same >= 4 {
            break;
        }
        last = Some(rect);
    }
    control(h, "Send").click();
    h.step();
}

fn last_reply(h: &Harness<'_, StudioApp>) -> (String, ReplyState) {
    let c = h.state().chat().current().expect("an open conversation");
    let m = c.messages.last().expect("a message");
    assert_eq!(m.role, ChatRole::Assistant);
    (
        m.content.trim().to_owned(),
        m.reply.as_ref().expect("reply info").state,
    )
}

fn saved_conversations(home: &Path) -> Vec<Conversation> {
    let dir = home.join("conversations");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("conversations folder") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        out.push(serde_json::from_str(&text).expect("a conversation file"));
    }
    out
}

#[test]
fn chat_streams_a_reply_from_a_model_loaded_in_the_models_panel() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_model(tmp.path());
    let mut h = harness(&home);
    h.step();

    // Without a model, Send is disabled and says why.
    assert!(shows_text(&h, "Load a model in the Models panel to chat"));
    assert!(!h.state().is_busy());

    load_through_models_panel(&mut h, &model);
    let info = h.state().model().expect("loaded").clone();
    assert_eq!(info.name, "gpt2-tiny-readable");
    assert!(
        shows_text(&h, "plain transcript"),
        "the Models panel shows the chat format"
    );
    assert_eq!(h.state().settings().recent_models, vec![model.clone()]);
    assert_eq!(h.state().settings().last_model.as_ref(), Some(&model));

    go_to(&mut h, Panel::Chat);
    assert!(shows_text(&h, "Chat format:"));
    send(&mut h, "Hello there");
    step_until(&mut h, "streamed text in the reply", |h| {
        !last_reply(h).0.is_empty()
    });
    step_until(&mut h, "the reply to finish", |h| {
        last_reply(h).1 != ReplyState::Streaming
    });
    h.step();
    let (text, state) = last_reply(&h);
    assert_eq!(state, ReplyState::Done);
    assert!(
        text.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '.'),
        "readable model output: {text:?}"
    );
    let shown: String = text.chars().take(20).collect();
    assert!(
        shows_text(&h, &shown),
        "the reply text {shown:?} is on screen"
    );
    assert!(
        shows_text(&h, "ms to first token"),
        "the reply shows its timing"
    );
    assert!(
        shows_text(&h, "Hello there"),
        "the user's message is on screen"
    );
    // The context counter counts prompt and reply.
    let used = h
        .state()
        .chat()
        .current()
        .and_then(Conversation::context_tokens)
        .expect("a token count");
    assert!(used > 0 && used <= info.context_length);
    assert!(shows_text(
        &h,
        &format!("{used} / {} tokens", info.context_length)
    ));

    // The conversation is on disk with the finished reply.
    let saved = saved_conversations(&home);
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].title, "Hello there");
    assert_eq!(saved[0].messages.len(), 2);
    assert_eq!(saved[0].messages[1].content.trim(), text);

    // Editing a message saves the conversation again.
    control(&h, "Edit").click();
    h.step();
    h.step();
    h.get_by_label("Edit message").focus();
    h.step();
    h.key_press(egui::Key::End);
    h.get_by_label("Edit message").type_text(", edited");
    h.step();
    control(&h, "Save").click();
    h.step();
    h.step();
    assert_eq!(
        saved_conversations(&home)[0].messages[0].content,
        "Hello there, edited"
    );
    assert!(shows_text(&h, "Hello there, edited"));
}

#[test]
fn stop_keeps_the_partial_reply_and_marks_it_stopped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    // Long context and a bigger network, so the reply is still streaming when Stop is clicked.
    let model = tmp.path().join("gpt2-long");
    write_gpt2_readable(
        &model,
        TinyGpt2 {
            n_positions: 4096,
            n_embd: 256,
            n_layer: 4,
            ..TinyGpt2::default()
        },
        11,
    );
    let mut h = harness(&home);
    {
        let settings = h.state_mut().settings_mut();
        settings.sampling.max_new_tokens = 100_000;
    }
    // Load through a command this time (what drag and drop and the recent list use).
    h.state_mut()
        .push_command(Command::LoadModel(model.clone()));
    step_until(&mut h, "the model to load", |h| h.state().model().is_some());

    send(&mut h, "Tell me a long story");
    step_until(&mut h, "streamed text", |h| !last_reply(h).0.is_empty());
    // While streaming, the partial reply reaches the disk every couple of seconds.
    step_until(&mut h, "the partial reply on disk", |_| {
        saved_conversations(&home)[0]
            .messages
            .get(1)
            .is_some_and(|m| !m.content.trim().is_empty())
    });
    assert_eq!(last_reply(&h).1, ReplyState::Streaming, "still streaming");
    assert!(
        h.state().jobs().running().is_some(),
        "the status bar has a running job"
    );
    assert!(shows_text(&h, "Replying"), "the status bar names the job");
    control(&h, "Stop").click();
    step_until(&mut h, "the job to end", |h| !h.state().is_busy());
    h.step();

    let (text, state) = last_reply(&h);
    assert_eq!(state, ReplyState::Stopped);
    assert!(!text.is_empty(), "the partial reply is kept");
    assert!(shows_text(&h, "Stopped"), "the reply is marked stopped");
    assert!(h.state().jobs().running().is_none());
    assert!(h.state().chat().active().is_none());
    assert!(shows_text(&h, "Idle"), "the status bar shows no job");

    let saved = saved_conversations(&home);
    let reply = saved[0].messages[1].reply.as_ref().expect("reply info");
    assert_eq!(reply.state, ReplyState::Stopped);
    assert_eq!(saved[0].messages[1].content.trim(), text);

    // Closing Studio mid-reply keeps what was written; it reopens marked interrupted.
    send(&mut h, "Another one");
    step_until(&mut h, "streamed text", |h| !last_reply(h).0.is_empty());
    drop(h);
    let h = harness(&home);
    let c = h.state().chat().current().expect("reopened");
    assert_eq!(c.messages.len(), 4);
    let last = &c.messages[3];
    assert!(!last.content.trim().is_empty());
    assert_eq!(
        last.reply.as_ref().map(|r| r.state),
        Some(ReplyState::Interrupted)
    );
}

#[test]
fn conversations_settings_and_the_model_come_back_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_model(tmp.path());
    let reply;
    {
        let mut h = harness(&home);
        load_through_models_panel(&mut h, &model);
        go_to(&mut h, Panel::Chat);
        // Ctrl+Enter sends.
        h.get_by_label("Message").focus();
        h.step();
        h.get_by_label("Message").type_text("Remember me");
        h.step();
        h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
        step_until(&mut h, "the reply to finish", |h| {
            h.state()
                .chat()
                .current()
                .is_some_and(|c| c.messages.len() == 2)
                && last_reply(h).1 == ReplyState::Done
        });
        reply = last_reply(&h).0;
        go_to(&mut h, Panel::Settings);
        assert!(shows_text(&h, "settings.json"));
        // Dropping the app (closing the window) writes the settings.
    }
    assert!(home.join("settings.json").exists());
    assert_eq!(saved_conversations(&home).len(), 1);

    let mut h = harness(&home);
    h.step();
    assert_eq!(
        h.state().settings().panel,
        Panel::Settings,
        "the last panel reopens"
    );
    step_until(&mut h, "the last model to load again", |h| {
        h.state().model().is_some()
    });
    go_to(&mut h, Panel::Chat);
    let c = h
        .state()
        .chat()
        .current()
        .expect("the conversation reopened");
    assert_eq!(c.title, "Remember me");
    assert_eq!(c.messages[0].content, "Remember me");
    assert_eq!(c.messages[1].content.trim(), reply);
    assert!(
        h.query_all_by_label("Remember me").count() >= 2,
        "listed and shown"
    );
    if !reply.is_empty() {
        let shown: String = reply.chars().take(20).collect();
        assert!(shows_text(&h, &shown));
    }

    // Regenerate replaces the reply with a new one (a new seed each reply by default).
    control(&h, "Regenerate").click();
    h.step();
    step_until(&mut h, "the new reply to finish", |h| {
        last_reply(h).1 == ReplyState::Done
    });
    let c = h.state().chat().current().expect("conversation");
    assert_eq!(
        c.messages.len(),
        2,
        "the old reply was replaced, not added to"
    );

    // A new chat, then delete it again after it has a message.
    control(&h, "New chat").click();
    h.step();
    send(&mut h, "Second chat");
    step_until(&mut h, "the reply to finish", |h| {
        last_reply(h).1 == ReplyState::Done
    });
    assert_eq!(saved_conversations(&home).len(), 2);
    control(&h, "Delete chat").click();
    h.step();
    control(&h, "Delete").click();
    h.step();
    h.step();
    assert_eq!(saved_conversations(&home).len(), 1);
    assert_eq!(
        h.state().chat().current().map(|c| c.title.clone()),
        Some("Remember me".to_owned())
    );
}

#[test]
fn unbuilt_panels_say_so_and_every_panel_names_its_inputs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tmp.path());
    h.step();
    for (panel, name) in [
        (Panel::Code, "Code Assist is not built yet"),
        (Panel::Canvas, "Canvas is not built yet"),
        (Panel::LatentExplorer, "Latent Explorer is not built yet"),
    ] {
        go_to(&mut h, panel);
        assert!(shows_text(&h, name), "{panel:?}");
        assert!(
            h.query_all_by_role(Role::TextInput).next().is_none(),
            "no fake controls on {panel:?}"
        );
    }
    for panel in [Panel::Chat, Panel::Models, Panel::Settings] {
        go_to(&mut h, panel);
        h.step();
        h.check_accessibility();
        assert!(!shows_text(&h, "not built yet"), "{panel:?}");
    }
    assert!(shows_text(&h, "Compiled backends"));
    assert!(shows_text(&h, "CPU"));
}

#[test]
fn choosing_a_preset_sets_its_parameters_only() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tmp.path());
    h.step();
    h.state_mut().settings_mut().sampling.max_new_tokens = 77;
    h.step();
    assert!(
        shows_text(&h, "Balanced"),
        "defaults match the Balanced preset"
    );
    control(&h, "Preset").click();
    h.step();
    h.step();
    control(&h, "Greedy").click();
    h.step();
    h.step();
    let p = &h.state().settings().sampling;
    assert!(p.temperature.abs() < f32::EPSILON);
    assert_eq!((p.top_k, p.max_new_tokens), (0, 77));
    assert!(shows_text(&h, "Always the most likely token"));
}

#[derive(Debug)]
struct DroppedPath(PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn dropping_a_pickle_checkpoint_shows_the_refusal_and_keeps_the_loaded_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tiny_model(tmp.path());
    let pickle = tmp.path().join("pytorch_model.bin");
    std::fs::write(&pickle, b"\x80\x02not really a pickle").expect("write");
    let mut h = harness(&tmp.path().join("home"));
    h.state_mut()
        .push_command(Command::LoadModel(model.clone()));
    step_until(&mut h, "the model to load", |h| h.state().model().is_some());
    control(&h, "Dismiss").click();
    h.step();
    h.step();
    assert!(h.state().notices().iter().next().is_none());

    h.input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(pickle)));
    step_until(&mut h, "the refusal notice", |h| {
        !h.state().is_busy() && h.state().notices().iter().next().is_some()
    });
    h.step();
    let notice = h
        .state()
        .notices()
        .iter()
        .next()
        .expect("a notice")
        .text
        .clone();
    assert!(notice.contains("pickle"), "{notice}");
    assert!(shows_text(&h, "Studio never unpickles files"));
    assert_eq!(
        h.state().model().map(|m| m.path.clone()),
        Some(model.clone()),
        "a refused file does not unload the loaded model"
    );
    assert_eq!(h.state().settings().recent_models, vec![model]);
    control(&h, "Dismiss").click();
    h.step();
    h.step();
    assert!(!shows_text(&h, "never unpickles"));
}

#[test]
fn long_conversations_leave_out_their_oldest_messages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tiny_model(tmp.path());
    let tokenizer = studio_inference::text::Tokenizer::from_file(&model.join("tokenizer.json"))
        .expect("tokenizer");
    let count = |messages: &[ChatMessage]| {
        tokenizer
            .encode(&render_plain("", messages))
            .expect("encode")
            .len()
    };
    // The context is 128 tokens; 40 are kept for the reply, so the prompt gets 88. Find a
    // second message that fits alone but not after the first exchange.
    let budget = TinyGpt2::default().n_positions - 40;
    let mut second = String::new();
    for word in ["dog", "fox", "the", "lazy", "quick"].iter().cycle() {
        let longer = format!("{second}{word} ");
        if count(&[ChatMessage::user(longer.trim())]) > budget {
            break;
        }
        second = longer;
    }
    let second = second.trim().to_owned();
    let history = [
        ChatMessage::user("Hi"),
        ChatMessage::assistant(""),
        ChatMessage::user(second.as_str()),
    ];
    assert!(count(&history) > budget, "the test message is long enough");

    let mut h = harness(&tmp.path().join("home"));
    h.state_mut().settings_mut().sampling.max_new_tokens = 40;
    h.state_mut().push_command(Command::LoadModel(model));
    step_until(&mut h, "the model to load", |h| h.state().model().is_some());
    send(&mut h, "Hi");
    step_until(&mut h, "the first reply", |h| {
        last_reply(h).1 == ReplyState::Done
    });
    send(&mut h, &second);
    step_until(&mut h, "the second reply", |h| {
        h.state()
            .chat()
            .current()
            .is_some_and(|c| c.messages.len() == 4)
            && last_reply(h).1 != ReplyState::Streaming
    });
    h.step();
    let c = h.state().chat().current().expect("conversation");
    let reply = c.messages[3].reply.as_ref().expect("reply info");
    assert_eq!(reply.state, ReplyState::Done, "{:?}", reply.error);
    assert_eq!(reply.dropped_messages, 2, "the first exchange was left out");
    assert!(shows_text(
        &h,
        "2 oldest messages were left out to fit the context"
    ));
    let used = c.context_tokens().expect("token count");
    assert!(used <= 128, "{used}");
}

#[test]
fn a_failed_reply_shows_the_error_and_keeps_the_conversation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_model(tmp.path());
    let mut h = harness(&home);
    h.state_mut().push_command(Command::LoadModel(model));
    step_until(&mut h, "the model to load", |h| h.state().model().is_some());
    // Far longer than the tiny model's 128-token context: the worker refuses it.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    send(&mut h, long.trim());
    step_until(&mut h, "the reply to fail", |h| {
        last_reply(h).1 == ReplyState::Failed
    });
    h.step();
    h.step();
    let c = h.state().chat().current().expect("conversation");
    let error = c.messages[1]
        .reply
        .as_ref()
        .and_then(|r| r.error.clone())
        .expect("the error is kept on the reply");
    assert!(error.contains("context"), "{error}");
    assert!(shows_text(&h, "The reply failed"), "a notice says so");
    assert!(shows_text(&h, "Failed: "), "the reply says so");
    let saved = saved_conversations(&home);
    assert_eq!(saved[0].messages[0].content, long.trim());
    assert_eq!(
        saved[0].messages[1].reply.as_ref().map(|r| r.state),
        Some(ReplyState::Failed)
    );
}
