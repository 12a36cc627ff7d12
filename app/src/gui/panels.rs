//! The panels themselves, from the panel list (`panel_list.rs`): [`Panels`] holds one of
//! each and passes the window's hooks on to them ([`PanelView`]), routing each command and
//! job event to the panel it belongs to.

use std::path::Path;

use studio_inference::worker::{Event, JobId};

use super::command::PanelCommand;
use super::context::{AppContext, Handled};
use super::jobs::PanelPurpose;
use super::panel::{OpenContext, PanelView, UiContext};
use super::panel_list::{Panel, panel_list};
use super::settings_store::Settings;

macro_rules! define_panels {
    ($($variant:ident { module: $module:ident, panel: $panel:ident, command: $command:ident, purpose: $purpose:ident, label: $label:literal },)*) => {
        /// One of each panel in the list.
        pub struct Panels {
            $(pub(super) $module: super::$module::$panel,)*
        }

        impl Panels {
            /// Opens every panel's saved state.
            pub fn open(cx: &mut OpenContext<'_>) -> Self {
                Self {
                    $($module: <super::$module::$panel as PanelView>::open(cx),)*
                }
            }

            /// Draws panel `shown`.
            pub fn ui(&mut self, shown: Panel, ui: &mut egui::Ui, cx: &mut UiContext<'_>) {
                match shown {
                    $(Panel::$variant => self.$module.ui(ui, cx),)*
                }
            }

            /// Gives a command to the panel it belongs to.
            pub fn apply(&mut self, command: PanelCommand, cx: &mut AppContext<'_>) {
                match command {
                    $(PanelCommand::$variant(c) => self.$module.apply(c, cx),)*
                }
            }

            /// Gives a job's event to the panel that submitted the job.
            pub fn on_event(
                &mut self,
                job: JobId,
                purpose: &PanelPurpose,
                event: Event,
                cx: &mut AppContext<'_>,
            ) -> Handled {
                match purpose {
                    $(PanelPurpose::$variant(p) => self.$module.on_event(job, p, event, cx),)*
                }
            }

            /// [`PanelView::restore`] on every panel.
            pub fn restore(&mut self, cx: &mut AppContext<'_>) {
                $(self.$module.restore(cx);)*
            }

            /// [`PanelView::frame`] on every panel.
            pub fn frame(&mut self, cx: &mut AppContext<'_>) {
                $(self.$module.frame(cx);)*
            }

            /// [`PanelView::settle`] on every panel.
            pub fn settle(&mut self, settings: &mut Settings) {
                $(self.$module.settle(settings);)*
            }

            /// The shortcuts of panel `shown`.
            pub fn shortcuts(&mut self, shown: Panel, cx: &mut AppContext<'_>) {
                match shown {
                    $(Panel::$variant => self.$module.shortcuts(cx),)*
                }
            }

            /// Offers a dropped file to panel `shown`, then to the others in list order;
            /// whether one took it.
            pub fn take_drop(&mut self, shown: Panel, path: &Path, cx: &mut AppContext<'_>) -> bool {
                let taken = match shown {
                    $(Panel::$variant => self.$module.take_drop(path, true, cx),)*
                };
                taken $(|| (shown != Panel::$variant && self.$module.take_drop(path, false, cx)))*
            }

            /// What dropping files does on panel `shown`, if not the window's default.
            pub fn drop_hint(&self, shown: Panel) -> Option<&'static str> {
                match shown {
                    $(Panel::$variant => self.$module.drop_hint(),)*
                }
            }

            /// [`PanelView::autosave`] on every panel; repaints when one wants to look again.
            pub fn autosave(&mut self, cx: &mut AppContext<'_>) {
                $(if let Some(wait) = self.$module.autosave(cx) {
                    cx.ctx.request_repaint_after(wait);
                })*
            }

            /// [`PanelView::flush`] on every panel.
            pub fn flush(&mut self, cx: &mut AppContext<'_>) {
                $(self.$module.flush(cx);)*
            }

            /// [`PanelView::close`] on every panel.
            pub fn close(&mut self, cx: &mut AppContext<'_>) {
                $(self.$module.close(cx);)*
            }
        }
    };
}

panel_list!(define_panels);
