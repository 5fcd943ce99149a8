//! MQTT topic templates: `devices/{device_id}/telemetry` and the like.

use std::fmt;

/// A parsed topic template with exactly one `{device_id}` level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
}

/// Why a template is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// No `{device_id}` level, or more than one.
    #[error("`{0}` must contain `{{device_id}}` exactly once, as a whole topic level")]
    Placeholder(String),
    /// MQTT wildcards or an empty level.
    #[error("`{0}` must not contain `+`, `#` or empty levels")]
    Level(String),
}

impl TopicTemplate {
    /// Parses a template.
    ///
    /// # Errors
    /// [`TemplateError`] when the template is not usable.
    pub fn parse(s: &str) -> Result<Self, TemplateError> {
        let mut levels = Vec::new();
        for part in s.split('/') {
            if part == "{device_id}" {
                levels.push(Level::Device);
            } else if part.contains("{device_id}") {
                return Err(TemplateError::Placeholder(s.to_owned()));
            } else if part.is_empty() || part.contains('+') || part.contains('#') {
                return Err(TemplateError::Level(s.to_owned()));
            } else {
                levels.push(Level::Literal(part.to_owned()));
            }
        }
        if levels.iter().filter(|l| **l == Level::Device).count() != 1 {
            return Err(TemplateError::Placeholder(s.to_owned()));
        }
        Ok(Self { levels })
    }

    /// The MQTT filter ingest subscribes to: the literal levels before the placeholder, then `#`.
    pub fn subscription_filter(&self) -> String {
        let mut parts: Vec<&str> = self
            .levels
            .iter()
            .map_while(|l| match l {
                Level::Literal(s) => Some(s.as_str()),
                Level::Device => None,
            })
            .collect();
        parts.push("#");
        parts.join("/")
    }

    /// The device id in `topic`, if the topic matches the template.
    pub fn device_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let mut device = None;
        let mut parts = topic.split('/');
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(s) if s == part => {}
                Level::Literal(_) => return None,
                Level::Device => device = Some(part),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        device
    }

    /// The topic a device publishes to.
    pub fn topic_for(&self, device: &str) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Device => device,
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.topic_for("{device_id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_aws_style_templates() {
        let t = TopicTemplate::parse("devices/{device_id}/telemetry")
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(t.subscription_filter(), "devices/#");
        assert_eq!(t.device_of("devices/d1/telemetry"), Some("d1"));
        assert_eq!(t.device_of("devices/d1/other"), None);
        assert_eq!(t.device_of("devices/d1/telemetry/x"), None);
        assert_eq!(t.device_of("devices/d1"), None);
        assert_eq!(t.topic_for("d9"), "devices/d9/telemetry");

        let aws = TopicTemplate::parse("NBtechv1/{device_id}/data")
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(aws.subscription_filter(), "NBtechv1/#");
        assert_eq!(aws.device_of("NBtechv1/sensor-7/data"), Some("sensor-7"));

        let bare = TopicTemplate::parse("{device_id}").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(bare.subscription_filter(), "#");
        assert_eq!(bare.device_of("abc"), Some("abc"));
    }

    #[test]
    fn invalid_templates() {
        for bad in [
            "devices/+/x",
            "devices/#",
            "devices/x",
            "a/{device_id}/{device_id}",
            "a//{device_id}",
            "a/dev{device_id}",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad}");
        }
    }
}
