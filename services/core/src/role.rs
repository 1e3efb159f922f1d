//! The roles one `smartfarm` binary can run. `serve` runs all of them by default; `--target` picks a subset, so
//! the same code runs as a monolith on a laptop and as separate deployments on Kubernetes.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// One service the binary can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// DeviceService: farms, devices, credentials, API keys.
    Device,
    /// IngestionService (the edge link) and TelemetryService (queries).
    Ingestion,
    /// ImageService.
    Image,
    /// InferenceService.
    Inference,
    /// AlertService.
    Alert,
    /// CommandService.
    Command,
}

impl Role {
    /// Every role, in the order they start.
    pub const ALL: [Role; 6] =
        [Role::Device, Role::Ingestion, Role::Image, Role::Inference, Role::Alert, Role::Command];

    /// The role's name on the command line and in config.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Ingestion => "ingestion",
            Role::Image => "image",
            Role::Inference => "inference",
            Role::Alert => "alert",
            Role::Command => "command",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|role| role.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
            Error::invalid("target", format!("unknown role {s:?}; expected all or some of {}", names.join(", ")))
        })
    }
}

/// The set of roles a process runs: `all`, or a comma-separated list such as `ingestion,alert`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Target(Vec<Role>);

impl Target {
    /// Every role.
    pub fn all() -> Target {
        Target(Role::ALL.to_vec())
    }

    /// Whether the process runs `role`.
    pub fn contains(&self, role: Role) -> bool {
        self.0.contains(&role)
    }

    /// The roles, in start order.
    pub fn roles(&self) -> &[Role] {
        &self.0
    }
}

impl Default for Target {
    fn default() -> Self {
        Target::all()
    }
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "all" {
            return Ok(Target::all());
        }
        let mut roles = Vec::new();
        for part in s.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(Error::invalid("target", "empty role name"));
            }
            let role: Role = part.parse()?;
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
        roles.sort();
        Ok(Target(roles))
    }
}

impl TryFrom<String> for Target {
    type Error = Error;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Target> for String {
    fn from(target: Target) -> String {
        target.to_string()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == Role::ALL {
            return f.write_str("all");
        }
        let names: Vec<_> = self.0.iter().map(|r| r.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print() {
        assert_eq!("all".parse::<Target>().unwrap(), Target::all());
        let subset: Target = "alert, ingestion,alert".parse().unwrap();
        assert_eq!(subset.roles(), &[Role::Ingestion, Role::Alert]);
        assert_eq!(subset.to_string(), "ingestion,alert");
        assert_eq!(Target::all().to_string(), "all");
        let error = "ingestion,weather".parse::<Target>().unwrap_err().to_string();
        assert!(error.contains("unknown role \"weather\""), "{error}");
        assert!("ingestion,".parse::<Target>().is_err());
    }
}
