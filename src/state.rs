//! [`AppState`]: the one piece of state shared by every handler.

use std::sync::Arc;

use crate::auth::password::Passwords;
use crate::auth::token::Tokens;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::store::Store;

/// Cheap to clone: every field is an `Arc`. There is no global state.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub tokens: Arc<Tokens>,
    pub passwords: Arc<Passwords>,
    pub delivery: Arc<Delivery>,
}
