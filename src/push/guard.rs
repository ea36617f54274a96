//! STUB until the integrator's SSRF guard lands on main (push-spec.md):
//! only the allow-list type the outbound client is built with.

/// Hosts a push request may go to even when private or plain `http`.
#[derive(Debug, Clone, Default)]
pub struct AllowHosts {
    entries: Vec<String>,
}

impl AllowHosts {
    pub fn parse(list: &[String]) -> Result<Self, String> {
        Ok(Self {
            entries: list.iter().map(|e| e.trim().to_ascii_lowercase()).collect(),
        })
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.entries
            .iter()
            .any(|e| *e == host || *e == format!("{host}:{port}"))
    }
}
