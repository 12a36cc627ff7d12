//! The window, driven like a person would: `egui_kittest` clicks widgets by their accessible
//! names and types into fields, headless (no window, no GPU), against a real inference worker
//! running tiny random-weight GPT-2 models written by `studio-tests`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use studio_app::gui::chat::command::ChatCommand;
use studio_app::gui::chat::store::{Conversation, Message, ReplyState};
use studio_app::gui::command::ExportFormat;
use studio_app::gui::{AppConfig, Command, Panel, StudioApp};
use studio_inference::llm::chat::{ChatMessage, Role as ChatRole, render_plain};
use studio_tests::{TinyGpt2, write_gpt2_readable};

mod common;
use common::{DroppedPath, control, go_to, shows_text, step_until};

fn harness(home: &Path) -> Harness<'static, StudioApp> {
    harness_with(&AppConfig::for_tests(home))
}

fn harness_with(config: &AppConfig) -> Harness<'static, StudioApp> {
    common::harness_sized(config, egui::vec2(1280.0, 860.0))
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

/// The open conversation as shown: (role, text) of each message on its active path.
fn shown_path(h: &Harness<'_, StudioApp>) -> Vec<(ChatRole, String)> {
    h.state()
        .chat()
        .current()
        .expect("an open conversation")
        .active_path()
        .iter()
        .map(|m| (m.role, m.content.trim().to_owned()))
        .collect()
}

fn last_reply(h: &Harness<'_, StudioApp>) -> (String, ReplyState) {
    let c = h.state().chat().current().expect("an open conversation");
    let path = c.active_path();
    let m = path.last().expect("a message");
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
        if !path.is_file() {
            continue; // trash/
        }
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
    assert_eq!(saved[0].version, 2);
    assert_eq!(saved[0].messages.len(), 2);
    assert_eq!(saved[0].messages[1].content.trim(), text);
    assert_eq!(saved[0].messages[1].parent, Some(saved[0].messages[0].id));
    // The parameters the reply was written with are saved with the conversation.
    assert_eq!(
        saved[0].sampling.as_ref().map(|p| p.max_new_tokens),
        Some(h.state().settings().sampling.max_new_tokens)
    );

    // Saving an edit changes the message in place and writes the conversation again.
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
    assert_eq!(
        saved_conversations(&home)[0].messages.len(),
        2,
        "no new branch"
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
    let path = c.active_path();
    assert_eq!(path.len(), 4);
    let last = path[3];
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
                .is_some_and(|c| c.active_path().len() == 2)
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
    assert_eq!(
        shown_path(&h),
        vec![
            (ChatRole::User, "Remember me".to_owned()),
            (ChatRole::Assistant, reply.clone())
        ]
    );
    assert!(
        h.query_all_by_label("Remember me").count() >= 2,
        "listed and shown"
    );
    if !reply.is_empty() {
        let shown: String = reply.chars().take(20).collect();
        assert!(shows_text(&h, &shown));
    }

    // Regenerate writes a new version of the reply (a new seed each reply by default); the
    // old one is kept as version 1 of 2.
    control(&h, "Regenerate").click();
    h.step();
    step_until(&mut h, "the new reply to finish", |h| {
        last_reply(h).1 == ReplyState::Done
    });
    h.step();
    let c = h.state().chat().current().expect("conversation");
    assert_eq!(c.active_path().len(), 2, "the path still has two messages");
    assert_eq!(c.messages.len(), 3, "the old reply is kept");
    assert!(shows_text(&h, "2/2"));

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
    h.step();
    assert_eq!(saved_conversations(&home).len(), 1);
    assert_eq!(
        h.state().chat().current().map(|c| c.title.clone()),
        Some("Remember me".to_owned())
    );
}

#[test]
fn every_panel_is_built_and_names_its_inputs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tmp.path());
    h.step();
    for panel in [
        Panel::Code,
        Panel::Chat,
        Panel::Canvas,
        Panel::LatentExplorer,
        Panel::Models,
        Panel::Settings,
    ] {
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

#[test]
fn dropping_a_broken_pickle_shows_the_error_and_keeps_the_loaded_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tiny_model(tmp.path());
    let pickle = model.join("pytorch_model.bin");
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
    assert!(notice.contains("pytorch_model.bin"), "{notice}");
    assert!(shows_text(&h, "corrupt or truncated"));
    assert_eq!(
        h.state().model().map(|m| m.path.clone()),
        Some(model.clone()),
        "a refused file does not unload the loaded model"
    );
    assert_eq!(h.state().settings().recent_models, vec![model]);
    control(&h, "Dismiss").click();
    h.step();
    h.step();
    assert!(!shows_text(&h, "corrupt or truncated"));
}

#[test]
fn long_conversations_leave_out_their_oldest_messages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tiny_model(tmp.path());
    let tokenizer =
        studio_inference::llm::text::Tokenizer::from_file(&model.join("tokenizer.json"))
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
            .is_some_and(|c| c.active_path().len() == 4)
            && last_reply(h).1 != ReplyState::Streaming
    });
    h.step();
    let c = h.state().chat().current().expect("conversation");
    let reply = c.active_path()[3].reply.as_ref().expect("reply info");
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

// ---- branches, Markdown, the conversation list, parameters --------------------------------

/// Every control named `name`, top to bottom on screen (the message box's buttons come last).
fn controls<'a>(h: &'a Harness<'_, StudioApp>, name: &'a str) -> Vec<egui_kittest::Node<'a>> {
    let mut found: Vec<_> = h
        .get_all_by(move |n| n.role() != Role::Label && n.label().as_deref() == Some(name))
        .collect();
    found.sort_by(|a, b| a.rect().top().total_cmp(&b.rect().top()));
    found
}

/// Clicks, then steps two frames (the click, then the commands it queued).
#[track_caller]
fn click(h: &mut Harness<'_, StudioApp>, name: &str) {
    control(h, name).click();
    h.step();
    h.step();
}

/// Waits for the open conversation's newest reply (on its path) to end.
#[track_caller]
fn wait_for_reply(h: &mut Harness<'_, StudioApp>) {
    step_until(h, "the reply to finish", |h| {
        h.state().chat().active().is_none()
            && h.state()
                .chat()
                .current()
                .and_then(|c| {
                    c.active_path()
                        .last()
                        .map(|m| m.role == ChatRole::Assistant)
                })
                .unwrap_or(false)
            && last_reply(h).1 != ReplyState::Streaming
    });
    h.step();
}

/// Prompt tokens of the plain transcript of `turns` (what GPT-2 models are sent).
fn plain_prompt_tokens(model: &Path, turns: &[ChatMessage]) -> usize {
    let tokenizer =
        studio_inference::llm::text::Tokenizer::from_file(&model.join("tokenizer.json"))
            .expect("tokenizer");
    tokenizer
        .encode(&render_plain("", turns))
        .expect("encode")
        .len()
}

/// Adds a saved conversation through the app's public API: `turns` alternate user/assistant.
fn add_conversation(h: &mut Harness<'_, StudioApp>, title: &str, turns: &[&str]) -> String {
    let chat = h.state_mut().chat_mut();
    let mut c = Conversation {
        title: title.to_owned(),
        ..Conversation::default()
    };
    for (i, text) in turns.iter().enumerate() {
        let m = if i % 2 == 0 {
            Message::user(*text)
        } else {
            Message::assistant(*text)
        };
        c.push_to_path(m);
    }
    let id = chat.store.insert(c);
    chat.store.save(&id).expect("save");
    id
}

#[test]
fn editing_an_earlier_message_makes_a_branch_that_survives_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_model(tmp.path());
    let edited_reply;
    {
        let mut h = harness(&home);
        h.state_mut().settings_mut().sampling.max_new_tokens = 8;
        h.state_mut()
            .push_command(Command::LoadModel(model.clone()));
        step_until(&mut h, "the model to load", |h| h.state().model().is_some());
        send(&mut h, "First question");
        wait_for_reply(&mut h);
        send(&mut h, "Second question");
        wait_for_reply(&mut h);
        let original = shown_path(&h);
        assert_eq!(original.len(), 4);

        // Edit the first message and resend it: a new version with its own reply.
        controls(&h, "Edit")[0].click();
        h.step();
        h.step();
        h.get_by_label("Edit message").focus();
        h.step();
        h.key_press(egui::Key::End);
        h.get_by_label("Edit message").type_text(", again");
        h.step();
        click(&mut h, "Resend");
        wait_for_reply(&mut h);
        let edited = shown_path(&h);
        assert_eq!(edited.len(), 2, "{edited:?}");
        assert_eq!(edited[0].1, "First question, again");
        edited_reply = edited[1].1.clone();
        assert!(
            shows_text(&h, "2/2"),
            "the edited message is version 2 of 2"
        );
        // The model was sent the new branch only.
        let c = h.state().chat().current().expect("conversation");
        assert_eq!(c.messages.len(), 6, "both branches are kept");
        let prompt = c.active_path()[1]
            .reply
            .as_ref()
            .and_then(|r| r.prompt_tokens)
            .expect("prompt tokens");
        assert_eq!(
            prompt,
            plain_prompt_tokens(&model, &[ChatMessage::user("First question, again")])
        );

        // `<` goes back to the first version with everything that followed it.
        click(&mut h, "<");
        assert_eq!(shown_path(&h), original);
        assert!(shows_text(&h, "1/2"));
        assert!(shows_text(&h, "Second question"));
        click(&mut h, ">");
        assert_eq!(shown_path(&h), edited);
        click(&mut h, "<");
        assert_eq!(shown_path(&h), original);
    }
    // The whole tree and the chosen branch are in the file and come back after a restart.
    let saved = saved_conversations(&home);
    assert_eq!(saved[0].messages.len(), 6);
    let mut h = harness(&home);
    h.step();
    h.step();
    let c = h.state().chat().current().expect("reopened");
    assert_eq!(c.messages.len(), 6);
    assert_eq!(
        shown_path(&h).len(),
        4,
        "the branch shown when Studio closed"
    );
    assert!(shows_text(&h, "1/2"));
    click(&mut h, ">");
    let path = shown_path(&h);
    assert_eq!(path[0].1, "First question, again");
    assert_eq!(path[1].1, edited_reply);
}

#[test]
fn regenerating_a_middle_reply_makes_a_new_version_of_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_model(tmp.path());
    let mut h = harness(&home);
    h.state_mut().settings_mut().sampling.max_new_tokens = 8;
    h.state_mut()
        .push_command(Command::LoadModel(model.clone()));
    step_until(&mut h, "the model to load", |h| h.state().model().is_some());
    send(&mut h, "One");
    wait_for_reply(&mut h);
    send(&mut h, "Two");
    wait_for_reply(&mut h);
    let original = shown_path(&h);

    // The first reply's own Regenerate (the message box's is the last on screen).
    let buttons = controls(&h, "Regenerate");
    assert_eq!(buttons.len(), 3, "one per reply and the message box's");
    buttons[0].click();
    h.step();
    wait_for_reply(&mut h);
    let path = shown_path(&h);
    assert_eq!(path.len(), 2, "{path:?}");
    assert_eq!(path[0], original[0]);
    assert!(shows_text(&h, "2/2"));
    let c = h.state().chat().current().expect("conversation");
    assert_eq!(c.messages.len(), 5);
    let prompt = c.active_path()[1]
        .reply
        .as_ref()
        .and_then(|r| r.prompt_tokens)
        .expect("prompt tokens");
    assert_eq!(
        prompt,
        plain_prompt_tokens(&model, &[ChatMessage::user("One")])
    );
    click(&mut h, "<");
    assert_eq!(shown_path(&h), original, "the first version keeps its turn");
    assert_eq!(saved_conversations(&home)[0].messages.len(), 5);
}

#[test]
fn exports_contain_the_conversation_as_shown() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let mut h = harness(&home);
    h.step();
    let id = add_conversation(&mut h, "Exported", &["Question", "Old answer"]);
    {
        let c = h
            .state_mut()
            .chat_mut()
            .store
            .get_mut(&id)
            .expect("conversation");
        let question = c.active_path()[0].id;
        let mut answer = Message::assistant("New answer");
        if let Some(r) = answer.reply.as_mut() {
            r.model = Some("tiny-model".into());
        }
        c.push(Some(question), answer);
        c.system_prompt = Some("Be brief.".into());
    }
    h.state_mut()
        .push_command(ChatCommand::SelectConversation(id.clone()));
    h.step();
    h.step();

    let md_path = tmp.path().join("out.md");
    let json_path = tmp.path().join("out.json");
    assert!(
        h.state_mut()
            .export_to(&id, ExportFormat::Markdown, &md_path)
    );
    assert!(h.state_mut().export_to(&id, ExportFormat::Json, &json_path));
    let md = std::fs::read_to_string(&md_path).expect("md");
    assert!(md.starts_with("# Exported"), "{md}");
    assert!(md.contains("**User:**\n\nQuestion"), "{md}");
    assert!(
        md.contains("New answer") && !md.contains("Old answer"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json")).expect("parse");
    assert_eq!(json["title"], "Exported");
    assert_eq!(json["model"], "tiny-model");
    assert_eq!(json["system_prompt"], "Be brief.");
    let messages = json["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[1]["content"], "New answer");
    assert_eq!(messages[1]["model"], "tiny-model");
    assert!(json["created"].as_str().is_some_and(|c| c.ends_with('Z')));

    // The header's Export menu copies the same Markdown (a menu opens for a pointer that was
    // already over its button).
    control(&h, "Export").hover();
    h.step();
    click(&mut h, "Export");
    control(&h, "Copy as Markdown").click();
    h.step();
    let copied = copied_text(&h).expect("copied");
    assert_eq!(copied, md);
}

/// Text the last frame put on the clipboard.
fn copied_text(h: &Harness<'_, StudioApp>) -> Option<String> {
    h.output()
        .platform_output
        .commands
        .iter()
        .find_map(|c| match c {
            egui::OutputCommand::CopyText(text) => Some(text.clone()),
            _ => None,
        })
}

#[test]
fn deleting_a_chat_can_be_undone_and_its_file_comes_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let config = AppConfig {
        undo_window: Duration::from_millis(600),
        ..AppConfig::for_tests(&home)
    };
    let mut h = harness_with(&config);
    h.step();
    let keep = add_conversation(&mut h, "Keep this one", &["a", "b"]);
    let gone = add_conversation(&mut h, "Delete this one", &["c", "d"]);
    h.state_mut()
        .push_command(ChatCommand::SelectConversation(gone.clone()));
    h.step();
    h.step();
    let file = home.join("conversations").join(format!("{gone}.json"));
    let trashed = home
        .join("conversations/trash")
        .join(format!("{gone}.json"));
    assert!(file.exists());

    click(&mut h, "Delete chat");
    assert!(
        !file.exists() && trashed.exists(),
        "moved to the trash first"
    );
    assert!(h.state().chat().store.get(&gone).is_none());
    assert!(shows_text(&h, "Deleted \"Delete this one\""));
    assert_eq!(h.state().chat().selected.as_deref(), Some(keep.as_str()));
    click(&mut h, "Undo");
    assert!(file.exists() && !trashed.exists(), "the file is back");
    assert_eq!(h.state().chat().selected.as_deref(), Some(gone.as_str()));
    assert_eq!(
        h.state().chat().current().map(|c| c.active_path().len()),
        Some(2)
    );
    assert!(!shows_text(&h, "Deleted \""), "the notice is gone");

    // Without Undo, the file goes for good once the notice has expired.
    click(&mut h, "Delete chat");
    assert!(trashed.exists());
    step_until(&mut h, "the undo window to pass", |_| !trashed.exists());
    assert!(!file.exists());
    assert!(!shows_text(&h, "Undo"));
    assert_eq!(saved_conversations(&home).len(), 1);
}

#[test]
fn search_filters_the_list_and_rename_works_in_place() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let mut h = harness(&home);
    h.step();
    let rust = add_conversation(&mut h, "Rust lifetimes", &["What is 'a?", "A lifetime."]);
    let soup = add_conversation(&mut h, "Soup recipe", &["Tomato soup?", "Simmer it."]);
    let other = add_conversation(&mut h, "Misc", &["hello", "hi"]);
    {
        // A hidden version of a reply counts too.
        let c = h.state_mut().chat_mut().store.get_mut(&other).expect("c");
        let first = c.active_path()[0].id;
        c.push(Some(first), Message::assistant("Also: TOMATO season"));
        c.choose(c.active_path()[0].id);
        let original = c.children(Some(first)).next().map(|m| m.id).expect("child");
        c.choose(original);
    }
    h.step();
    let listed = |h: &Harness<'_, StudioApp>, title: &str| {
        h.query_all_by(|n| n.role() != Role::Label && n.label().as_deref() == Some(title))
            .next()
            .is_some()
    };
    assert!(listed(&h, "Rust lifetimes") && listed(&h, "Soup recipe"));

    h.get_by_label("Search chats").focus();
    h.step();
    h.get_by_label("Search chats").type_text("tomato");
    h.step();
    h.step();
    assert!(listed(&h, "Soup recipe"), "title or messages match");
    assert!(listed(&h, "Misc"), "a hidden branch matches");
    assert!(!listed(&h, "Rust lifetimes"));
    assert!(shows_text(&h, "2 of 3 chats"));
    click(&mut h, "×");
    assert!(listed(&h, "Rust lifetimes"));

    // Rename the open chat in the list.
    h.state_mut()
        .push_command(ChatCommand::SelectConversation(rust.clone()));
    h.step();
    click(&mut h, "Rename");
    let field = h.get_by_label("Conversation title");
    assert!(field.is_focused());
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_label("Conversation title").type_text("Borrowing");
    h.step();
    h.key_press(egui::Key::Enter);
    h.step();
    h.step();
    assert_eq!(
        h.state().chat().current().map(|c| c.title.clone()),
        Some("Borrowing".to_owned())
    );
    assert!(listed(&h, "Borrowing"));
    let saved = saved_conversations(&home);
    assert!(saved.iter().any(|c| c.id == rust && c.title == "Borrowing"));
    assert!(saved.iter().any(|c| c.id == soup));
}

#[test]
fn code_blocks_in_replies_are_highlighted_and_copied_with_their_button() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    let code = "fn main() {\n    println!(\"hi\");\n}";
    let reply =
        format!("Here is **the** program:\n\n```rust\n{code}\n```\n\nRun it with `cargo run`.");
    let id = add_conversation(&mut h, "Code", &["Write hello world", &reply]);
    h.state_mut()
        .push_command(ChatCommand::SelectConversation(id));
    h.step();
    h.step();
    assert!(shows_text(&h, "Here is the program:"), "Markdown, not raw");
    assert!(!shows_text(&h, "**the**"));
    assert!(shows_text(&h, "println!"));
    assert!(shows_text(&h, "rust"), "the block names its language");

    control(&h, "Copy code").click();
    h.step();
    assert_eq!(copied_text(&h).as_deref(), Some(code));
    h.step();
    assert!(shows_text(&h, "Copied"));

    // Finished replies are parsed once, not every frame.
    let parses = h.state().chat().markdown().parses();
    for _ in 0..5 {
        h.step();
    }
    assert_eq!(h.state().chat().markdown().parses(), parses);
}

#[test]
fn version_1_conversation_files_still_open_and_are_upgraded_when_saved() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let dir = home.join("conversations");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("1700000000000.json"),
        r#"{
  "version": 1,
  "id": "1700000000000",
  "title": "From before branches",
  "created_ms": 1700000000000,
  "updated_ms": 1700000000000,
  "messages": [
    { "role": "User", "content": "Old question" },
    { "role": "Assistant", "content": "Old answer",
      "reply": { "state": "Done", "model": "gpt2", "seed": 1 } },
    { "role": "User", "content": "Follow-up" }
  ]
}"#,
    )
    .expect("write");
    let mut h = harness(&home);
    h.step();
    h.step();
    assert!(h.state().notices().iter().next().is_none(), "no errors");
    assert_eq!(
        shown_path(&h),
        vec![
            (ChatRole::User, "Old question".to_owned()),
            (ChatRole::Assistant, "Old answer".to_owned()),
            (ChatRole::User, "Follow-up".to_owned())
        ]
    );
    assert!(shows_text(&h, "Old answer") && shows_text(&h, "Follow-up"));
    // Saving writes the current format, with the same messages.
    click(&mut h, "Rename");
    h.get_by_label("Conversation title").type_text(" (renamed)");
    h.key_press(egui::Key::Enter);
    h.step();
    h.step();
    let saved = saved_conversations(&home);
    assert_eq!(saved[0].version, 2);
    assert_eq!(saved[0].title, "From before branches (renamed)");
    let ids: Vec<u64> = saved[0].messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(saved[0].messages[2].parent, Some(2));
}

#[test]
fn parameters_and_system_prompt_belong_to_each_conversation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let mut h = harness(&home);
    h.step();
    let a = add_conversation(&mut h, "Chat A", &["a", "b"]);
    let b = add_conversation(&mut h, "Chat B", &["c", "d"]);
    {
        let c = h.state_mut().chat_mut().store.get_mut(&b).expect("b");
        c.sampling = Some(studio_inference::llm::sampling::SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..studio_inference::llm::sampling::SamplingParams::default()
        });
        c.system_prompt = Some("You are B.".into());
    }
    h.state_mut()
        .push_command(ChatCommand::SelectConversation(a.clone()));
    h.step();
    h.step();
    // A has none of its own yet: it shows the last used. Choose a system prompt from the
    // gallery for it.
    control(&h, "Gallery").click();
    h.step();
    h.step();
    control(&h, "Coding assistant").click();
    h.step();
    h.step();
    let prompt = h.state().settings().system_prompt.clone();
    assert!(prompt.contains("software engineer"), "{prompt}");
    h.state_mut().settings_mut().sampling.max_new_tokens = 123;
    h.step();

    // Opening B shows B's; back to A shows A's again.
    control(&h, "Chat B").click();
    h.step();
    h.step();
    assert_eq!(h.state().settings().system_prompt, "You are B.");
    assert!(h.state().settings().sampling.temperature.abs() < f32::EPSILON);
    assert!(
        shows_text(&h, "Greedy"),
        "B's parameters match the Greedy preset: {:?}",
        h.state().settings().sampling
    );
    control(&h, "Chat A").click();
    h.step();
    h.step();
    assert_eq!(h.state().settings().system_prompt, prompt);
    assert_eq!(h.state().settings().sampling.max_new_tokens, 123);
    assert!(shows_text(&h, "Coding assistant"));

    // A's parameters reach its file (a moment later, or when Studio closes).
    drop(h);
    let saved = saved_conversations(&home);
    let saved_a = saved.iter().find(|c| c.id == a).expect("a");
    assert_eq!(saved_a.system_prompt.as_deref(), Some(prompt.as_str()));
    assert_eq!(
        saved_a.sampling.as_ref().map(|p| p.max_new_tokens),
        Some(123)
    );
    // A new chat starts from the last ones used (A's, open when Studio closed).
    let mut h = harness(&home);
    h.step();
    click(&mut h, "New chat");
    assert_eq!(h.state().settings().system_prompt, prompt);
    assert_eq!(h.state().settings().sampling.max_new_tokens, 123);
}

#[test]
fn the_context_length_load_option_reaches_the_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_model(tmp.path());
    let mut h = harness(&home);
    h.step();
    go_to(&mut h, Panel::Models);
    assert!(shows_text(&h, "Auto (the model's maximum)"));
    click(&mut h, "Auto (the model's maximum)");
    assert_eq!(h.state().settings().context_length, Some(4096));
    h.state_mut().settings_mut().context_length = Some(64);
    h.step();
    load_through_models_panel(&mut h, &model);
    assert_eq!(h.state().model().map(|m| m.context_length), Some(64));
    go_to(&mut h, Panel::Chat);
    assert!(shows_text(&h, "Context 64 tokens"));

    // Back to Auto: the panel offers to reload, which gives the model's maximum.
    go_to(&mut h, Panel::Models);
    click(&mut h, "Auto (the model's maximum)");
    assert_eq!(h.state().settings().context_length, None);
    assert!(shows_text(&h, "is loaded with 64 tokens of context"));
    click(&mut h, "Reload");
    step_until(&mut h, "the reload", |h| {
        h.state().model().map(|m| m.context_length) == Some(128)
    });
    drop(h);
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(home.join("settings.json")).expect("settings"),
    )
    .expect("json");
    assert!(settings["context_length"].is_null());
}

#[test]
fn a_remote_openai_server_set_up_in_settings_answers_in_the_chat() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    // A real OpenAI-compatible server on loopback: `studio serve`'s, on a tiny GPT-2.
    let model = tiny_model(tmp.path());
    let loaded =
        studio_inference::llm::loader::load(&model, &candle_core::Device::Cpu, &mut |_, _| {})
            .expect("load");
    let server = studio_app::serve::Server::start(
        studio_app::serve::ServedModel::owned(loaded),
        &studio_app::serve::ServeOptions {
            port: 0,
            ..Default::default()
        },
    )
    .expect("serve");
    let mut h = harness(&home);
    h.step();
    go_to(&mut h, Panel::Settings);
    h.get_by_label("Base URL").focus();
    h.step();
    h.get_by_label("Base URL").type_text(&server.base_url());
    h.step();
    click(&mut h, "Connect");
    step_until(&mut h, "the remote model", |h| {
        h.state()
            .model()
            .is_some_and(|m| m.architecture == studio_inference::llm::loader::Architecture::Remote)
    });
    // The address is remembered for next time.
    assert_eq!(h.state().settings().remote.base_url, server.base_url());
    go_to(&mut h, Panel::Chat);
    send(&mut h, "Hello there");
    wait_for_reply(&mut h);
    let (text, state) = last_reply(&h);
    assert!(!text.is_empty(), "no text streamed from the server");
    assert!(matches!(state, ReplyState::Done), "{state:?}");
    drop(h);
    server.shutdown();
}

#[test]
fn an_unreachable_remote_server_is_reported_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let mut h = harness(&home);
    h.step();
    go_to(&mut h, Panel::Settings);
    h.get_by_label("Base URL").focus();
    h.step();
    // Nothing listens on port 9 (discard) of loopback here.
    h.get_by_label("Base URL")
        .type_text("http://127.0.0.1:9/v1");
    h.step();
    click(&mut h, "Connect");
    step_until(&mut h, "the connection error", |h| {
        shows_text(h, "Could not connect to http://127.0.0.1:9/v1")
    });
    assert!(h.state().model().is_none());
}

/// Ctrl+Enter arriving with the last typed characters sends all of them and empties the box.
/// (The window once sent the message without them when both came in one slow frame; the
/// headless harness does not reproduce that timing, so that fix was checked in the real window
/// under Xvfb.)
#[test]
fn ctrl_enter_in_the_same_frame_as_typing_sends_everything_typed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tiny_model(tmp.path());
    let mut h = harness(&home);
    load_through_models_panel(&mut h, &model);
    go_to(&mut h, Panel::Chat);
    h.get_by_label("Message").focus();
    h.step();
    h.event(egui::Event::Text("Write a haiku about GGUF".to_owned()));
    h.step();
    // The rest of the text and the shortcut arrive in one frame, as from a real keyboard.
    h.event(egui::Event::Text(" files.".to_owned()));
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    h.step();
    h.step();
    let c = h.state().chat().current().expect("a conversation");
    let first = c
        .active_path()
        .first()
        .expect("the message")
        .content
        .clone();
    assert_eq!(first, "Write a haiku about GGUF files.");
    assert!(
        h.state().chat().input.is_empty(),
        "{:?}",
        h.state().chat().input
    );
    wait_for_reply(&mut h);
}

#[test]
fn a_gguf_model_chats_in_the_window_with_its_own_template() {
    use studio_tests::gguf_writer::{GgufOptions, write_family_gguf};
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let gguf = write_family_gguf(
        &tmp.path().join("qwen"),
        "qwen2",
        8,
        &GgufOptions {
            chat_template: Some(chatml.to_owned()),
            ..GgufOptions::with_dtype(candle_core::quantized::GgmlDType::Q8_0)
        },
    );
    // A random-weight model writes arbitrary bytes; the window draws a box for characters no
    // font has (egui's default policy), so this test allows them too.
    let app = StudioApp::new(&egui::Context::default(), &AppConfig::for_tests(&home));
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 860.0))
        .allow_missing_glyphs()
        .build_ui_state(
            |ui, app: &mut StudioApp| {
                app.frame_logic(ui.ctx());
                app.root_ui(ui);
            },
            app,
        );
    h.step();
    load_through_models_panel(&mut h, &gguf);
    let info = h.state().model().expect("loaded").clone();
    assert!(info.dtype.contains("Q8_0"), "{}", info.dtype);
    assert!(info.chat_format.contains("ChatML"), "{}", info.chat_format);
    go_to(&mut h, Panel::Chat);
    assert!(
        shows_text(&h, "ChatML"),
        "the chat header names the active template"
    );
    send(&mut h, "Hello there");
    wait_for_reply(&mut h);
    let (_, state) = last_reply(&h);
    assert!(matches!(state, ReplyState::Done), "{state:?}");
    // The prompt was the template's: far more tokens than the plain transcript of one message.
    let c = h.state().chat().current().expect("conversation");
    let reply = c
        .active_path()
        .last()
        .expect("reply")
        .reply
        .clone()
        .expect("info");
    let prompt_tokens = reply.prompt_tokens.expect("prompt tokens");
    let m = studio_inference::llm::loader::load(&gguf, &candle_core::Device::Cpu, &mut |_, _| {})
        .expect("load");
    let templated = m
        .tokenizer
        .encode("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
        .expect("encode")
        .len();
    assert_eq!(prompt_tokens, templated);
}

/// One HTTP/1.1 exchange on loopback: (status, body), chunked bodies left as they are.
fn http_exchange(url: &str, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let authority = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .expect("authority");
    let mut s = std::net::TcpStream::connect(authority).expect("connect");
    s.set_read_timeout(Some(Duration::from_mins(1)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{headers}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `exchange` on another thread while the window keeps drawing (its worker's events must
/// be drained for the server's jobs to finish).
fn while_stepping<T: Send + 'static>(
    h: &mut Harness<'_, StudioApp>,
    exchange: impl FnOnce() -> T + Send + 'static,
) -> T {
    let client = studio_tests::spawn_named("api-client", exchange);
    step_until(h, "the HTTP exchange", |_| client.is_finished());
    client.join().expect("client")
}

#[test]
fn the_api_server_started_in_settings_serves_the_loaded_model_until_stopped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tiny_model(tmp.path());
    let mut h = harness(&tmp.path().join("home"));
    h.step();
    go_to(&mut h, Panel::Settings);
    assert!(
        control(&h, "Start server").accesskit_node().is_disabled(),
        "no model, no server"
    );
    load_through_models_panel(&mut h, &model);
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr").port()
    };
    h.state_mut().settings_mut().server.port = port;
    go_to(&mut h, Panel::Settings);
    click(&mut h, "New key");
    let key = h.state().settings().server.api_key.clone();
    assert!(key.starts_with("sk-studio-") && key.len() > 40, "{key}");
    assert!(!shows_text(&h, &key), "the key is masked");
    click(&mut h, "Show key");
    assert!(shows_text(&h, &key), "and shown on asking");
    click(&mut h, "Start server");
    step_until(&mut h, "the server to start", |h| {
        matches!(
            h.state().api_server().status(),
            studio_app::gui::api_server::ServerStatus::Running { .. }
        )
    });
    h.step();
    let url = format!("http://127.0.0.1:{port}/v1");
    assert!(shows_text(&h, &url), "the address is shown");
    assert!(shows_text(&h, "Serving"));

    let (status, _) = {
        let url = url.clone();
        while_stepping(&mut h, move || {
            http_exchange(&url, "GET", "/v1/models", "", "")
        })
    };
    assert_eq!(status, 401, "the key is required");
    let auth = format!("Authorization: Bearer {key}\r\n");
    let (status, body) = {
        let (url, auth) = (url.clone(), auth.clone());
        while_stepping(&mut h, move || {
            http_exchange(&url, "GET", "/v1/models", &auth, "")
        })
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("gpt2-tiny-readable"), "{body}");
    let chat = serde_json::json!({
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6, "temperature": 0
    })
    .to_string();
    let (status, body) = {
        let (url, auth, chat) = (url.clone(), auth.clone(), chat.clone());
        while_stepping(&mut h, move || {
            http_exchange(&url, "POST", "/v1/chat/completions", &auth, &chat)
        })
    };
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        answer["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=6).contains(&n)),
        "{answer}"
    );
    // The same request streamed gives the same (greedy) text, generated on the worker.
    let streamed = chat.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"");
    let (status, events) = {
        let (url, auth) = (url.clone(), auth.clone());
        while_stepping(&mut h, move || {
            http_exchange(&url, "POST", "/v1/chat/completions", &auth, &streamed)
        })
    };
    assert_eq!(status, 200);
    assert!(events.contains("[DONE]"), "{events}");

    click(&mut h, "Stop server");
    assert!(shows_text(&h, "The API server stopped"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens once stopped"
    );
    assert!(!control(&h, "Start server").accesskit_node().is_disabled());
    // Started again, it stops with the model it serves.
    click(&mut h, "Start server");
    step_until(&mut h, "the server to start again", |h| {
        matches!(
            h.state().api_server().status(),
            studio_app::gui::api_server::ServerStatus::Running { .. }
        )
    });
    h.state_mut().push_command(Command::UnloadModel);
    step_until(&mut h, "the server to stop with the model", |h| {
        h.state().api_server().status() == studio_app::gui::api_server::ServerStatus::Stopped
    });
    h.step();
    assert!(shows_text(&h, "stopped with the model"));
}

/// Emoji common in replies have glyphs (Studio's Noto Emoji fallback), in text and in code.
#[test]
fn emoji_in_replies_have_glyphs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tmp.path());
    h.step();
    let emoji = "🙂🤖🥲🫠🚀✅👍";
    for font in [
        egui::FontId::proportional(14.0),
        egui::FontId::monospace(14.0),
    ] {
        let missing: String = emoji
            .chars()
            .filter(|&c| !h.ctx.fonts_mut(|f| f.has_glyph(&font, c)))
            .collect();
        assert!(missing.is_empty(), "no glyph in {font:?} for {missing}");
    }
}

/// A dropped folder whose weights are transformers' `pytorch_model.bin` loads in safe mode
/// (read as data), and the Models panel says so; *Save as safetensors* converts it, value for
/// value.
#[test]
fn a_pickled_model_loads_in_safe_mode_and_saves_as_safetensors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let folder = tmp.path().join("gpt2-bin");
    std::fs::create_dir_all(&folder).expect("dir");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    std::fs::copy(
        fixtures.join("gpt2-tiny/config.json"),
        folder.join("config.json"),
    )
    .expect("config");
    std::fs::copy(
        fixtures.join("pickles/gpt2_pytorch_model.bin"),
        folder.join("pytorch_model.bin"),
    )
    .expect("weights");
    studio_tests::write_word_level_tokenizer(&folder, 97);
    let mut h = harness(&tmp.path().join("home"));
    h.input_mut()
        .dropped_files
        .push(Arc::new(DroppedPath(folder.clone())));
    step_until(&mut h, "the pickled model to load", |h| {
        h.state().model().is_some()
    });
    assert_eq!(
        h.state().model().map(|m| m.path.clone()),
        Some(folder.clone())
    );
    h.state_mut()
        .push_command(Command::ShowPanel(Panel::Models));
    h.step();
    h.step();
    assert!(shows_text(&h, "Read in safe mode"));
    assert!(shows_text(&h, "Save as safetensors…"));

    // The button asks where with a file dialog; what it then does:
    let out = folder.join("model.safetensors");
    h.state_mut().push_command(Command::ConvertCheckpoint {
        from: folder.join("pytorch_model.bin"),
        to: out.clone(),
    });
    step_until(&mut h, "the conversion", |h| {
        !h.state().is_busy() && shows_text(h, "nothing in it ran")
    });
    let written = std::fs::read(&out).expect("converted");
    let reference = std::fs::read(fixtures.join("gpt2-tiny/model.safetensors")).expect("fixture");
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&written).expect("converted"),
        safetensors::SafeTensors::deserialize(&reference).expect("fixture"),
    );
    assert_eq!(a.len(), b.len());
    for name in b.names() {
        assert_eq!(
            a.tensor(name).expect(name).data(),
            b.tensor(name).expect(name).data()
        );
    }
}

/// A Qwen2 saved by transformers 5 (`rope_parameters`, `"sliding_window": null`, `dtype`)
/// loads in the window as it does on the command line.
#[test]
fn a_transformers5_qwen2_loads_in_the_window() {
    let tmp = tempfile::tempdir().expect("tmp");
    let folder = tmp.path().join("qwen2-tf5");
    std::fs::create_dir_all(&folder).expect("dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2-tf5");
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(name), folder.join(name)).expect("copy");
    }
    studio_tests::write_word_level_tokenizer(&folder, 97);
    let mut h = harness(&tmp.path().join("home"));
    h.state_mut()
        .push_command(Command::LoadModel(folder.clone()));
    step_until(&mut h, "the model to load", |h| h.state().model().is_some());
    let model = h.state().model().expect("loaded");
    assert_eq!(model.architecture.label(), "Qwen2");
    assert_eq!(model.path, folder);
}

/// Structured output in the Chat panel: the JSON-schema mode chosen in the parameters (the
/// schema typed in its field, checked as typed), and a random-weight Qwen2's reply is JSON
/// that fits it; a schema keyword Studio would not enforce is shown as an error.
#[test]
fn the_chat_keeps_a_reply_to_a_json_schema_chosen_in_the_parameters() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tmp.path().join("qwen2");
    studio_tests::families::write_family(&model, "qwen2", 5);
    let mut h = harness(&home);
    h.step();
    load_through_models_panel(&mut h, &model);
    go_to(&mut h, Panel::Chat);
    h.state_mut().settings_mut().sampling.temperature = 1.0;
    h.state_mut().settings_mut().sampling.max_new_tokens = 300;
    h.state_mut().settings_mut().sampling.structured =
        studio_inference::llm::grammar::StructuredOutput::JsonSchema {
            schema: String::new(),
        };
    h.step();
    control(&h, "Structured output").click();
    h.step();
    h.step();
    h.get_by_label(studio_app::gui::chat::params::STRUCTURE_LABEL)
        .focus();
    h.step();
    h.get_by_label(studio_app::gui::chat::params::STRUCTURE_LABEL)
        .type_text(r#"{"type": "string", "pattern": "a+"}"#);
    h.step();
    h.step();
    assert!(shows_text(&h, "`pattern`"), "the refused keyword is named");
    let schema = r#"{"type": "object", "properties": {"mood": {"enum": ["good", "bad"]}, "score": {"type": "integer"}}, "required": ["mood", "score"]}"#;
    h.state_mut().settings_mut().sampling.structured =
        studio_inference::llm::grammar::StructuredOutput::JsonSchema {
            schema: schema.to_owned(),
        };
    h.step();
    h.step();
    assert!(shows_text(&h, "Enforced on every reply"));
    send(&mut h, "How was your day?");
    wait_for_reply(&mut h);
    let (reply, state) = last_reply(&h);
    assert_eq!(state, ReplyState::Done, "{reply}");
    let v: serde_json::Value =
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"));
    assert!(
        ["good", "bad"].contains(&v["mood"].as_str().unwrap_or("")),
        "{v}"
    );
    // An integer: "-0" is one too (JSON has it; serde_json reads it as -0.0).
    assert!(
        v["score"].as_f64().is_some_and(|x| x.fract() == 0.0) && !reply.contains('.'),
        "{reply}"
    );
}

/// Tools in the Chat panel: tools defined in the parameters reach the model through its own
/// template (Qwen2.5's); a reply that calls one (here made to by a grammar) shows the call with
/// a field for its result; *Send results* adds the result as a tool message, which goes back
/// to the model with the call, and the model replies again.
#[test]
fn a_tool_call_is_shown_and_its_result_sent_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let model = tmp.path().join("qwen2");
    studio_tests::families::write_family_with(
        &model,
        "qwen2",
        &serde_json::json!({"max_position_embeddings": 4096}),
        5,
    );
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/templates/qwen2.5-instruct.jinja"),
    )
    .expect("template");
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>"}).to_string(),
    )
    .expect("write");
    let mut h = harness(&home);
    h.step();
    load_through_models_panel(&mut h, &model);
    go_to(&mut h, Panel::Chat);
    {
        let s = &mut h.state_mut().settings_mut().sampling;
        s.tools = Some(serde_json::json!([{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]));
        s.structured = studio_inference::llm::grammar::StructuredOutput::Gbnf {
            grammar: r#"root ::= "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>""#.to_owned(),
        };
        s.max_new_tokens = 200;
    }
    h.step();
    send(&mut h, "What is the weather in Oslo?");
    wait_for_reply(&mut h);
    assert!(
        shows_text(&h, "Tool call"),
        "the call is shown: {:?}",
        last_reply(&h)
    );
    assert!(shows_text(&h, r#"get_weather({"city":"Oslo"})"#));
    let field = studio_app::gui::chat::tool_result_label("get_weather");
    h.get_by_label(&field).focus();
    h.step();
    h.get_by_label(&field).type_text("12 degrees and windy");
    h.step();
    h.step();
    control(&h, "Send results").click();
    h.step();
    wait_for_reply(&mut h);
    let roles: Vec<ChatRole> = shown_path(&h).iter().map(|(r, _)| *r).collect();
    assert_eq!(
        roles,
        [
            ChatRole::User,
            ChatRole::Assistant,
            ChatRole::Tool,
            ChatRole::Assistant
        ]
    );
    // What the second reply was asked with: the call, and its result answering it.
    let c = h.state().chat().current().expect("conversation");
    let path = c.active_path();
    let turns = c.turns_to(path[2].id);
    assert_eq!(turns[1].tool_calls.len(), 1, "{turns:?}");
    assert_eq!(turns[1].tool_calls[0].name, "get_weather");
    assert_eq!(turns[2].role, ChatRole::Tool);
    assert_eq!(turns[2].content, "12 degrees and windy");
    assert_eq!(
        turns[2].tool_call_id.as_deref(),
        Some(turns[1].tool_calls[0].id.as_str())
    );
}
