//! The broker of a node alone: nothing to reach, nothing to wait for.

use async_trait::async_trait;
use uuid::Uuid;

use super::{Announce, Broker, Interest, Notice, Push, Status};
use crate::store::DeviceId;

pub struct LocalBroker;

#[async_trait]
impl Broker for LocalBroker {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn alone(&self) -> bool {
        true
    }

    fn status(&self) -> Status {
        Status::Local
    }

    async fn interest(&self, _user: Uuid, _device: DeviceId) -> Interest {
        Interest::none()
    }

    fn committed(&self, _push: Push) {}

    async fn ephemeral(&self, _push: Push, _ask: bool) -> bool {
        false
    }

    fn notify(&self, _user: Uuid, _notice: Notice) {}

    fn announce(&self, _event: Announce) {}
}

/// A broker that records what the node would have published, for unit
/// tests of the parts that publish.
#[cfg(test)]
#[derive(Default)]
pub struct Recorder {
    pub pushes: std::sync::Mutex<Vec<Push>>,
}

#[cfg(test)]
#[async_trait]
impl Broker for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }

    fn status(&self) -> Status {
        Status::Connected
    }

    async fn interest(&self, _user: Uuid, _device: DeviceId) -> Interest {
        Interest::none()
    }

    fn committed(&self, push: Push) {
        self.pushes.lock().unwrap().push(push);
    }

    async fn ephemeral(&self, _push: Push, _ask: bool) -> bool {
        false
    }

    fn notify(&self, _user: Uuid, _notice: Notice) {}

    fn announce(&self, _event: Announce) {}
}
