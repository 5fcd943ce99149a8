//! How errors are classified across the pipeline.
//!
//! Every error type in this crate can say which of three things it is, because the runtime reacts
//! differently to each: the user's input is dead-lettered and the stream moves on; an external fault
//! (a store or broker unreachable, throttling) is retried with backoff and nothing is committed
//! meanwhile; a bug is logged loudly and stops the operator rather than committing wrong results.

/// What kind of failure an error is, which decides how the runtime reacts to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad input from a device or user: dead-letter it, never retry.
    Input,
    /// A dependency failed or pushed back: retry with backoff, do not commit meanwhile.
    External,
    /// An invariant of ours broke: stop instead of committing something wrong.
    Bug,
}

impl ErrorClass {
    /// The label used for this class in metrics (`error_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::External => "external",
            Self::Bug => "bug",
        }
    }
}

/// Implemented by every error the runtime handles, so it can decide between retry and stop.
pub trait Retryable {
    /// This error's class.
    fn class(&self) -> ErrorClass;
}
