//! The server's error kinds and how each maps to HTTP status and gRPC code.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed request, unknown input, wrong dtype/shape: 400 / INVALID_ARGUMENT.
    BadRequest,
    /// Unknown model or version: 404 / NOT_FOUND.
    NotFound,
    /// Body over the configured limit: 413 / RESOURCE_EXHAUSTED.
    TooLarge,
    /// Queue or concurrency limit reached: 429 / RESOURCE_EXHAUSTED.
    QueueFull,
    /// Model not ready (failed to load) or server shutting down: 503 / UNAVAILABLE.
    Unavailable,
    /// The request's time limit passed: 504 / DEADLINE_EXCEEDED.
    Timeout,
    /// A real internal failure: 500 / INTERNAL.
    Internal,
}

impl ErrorKind {
    /// The `outcome` label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::TooLarge => 413,
            ErrorKind::QueueFull => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Internal => 500,
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::BadRequest => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::TooLarge | ErrorKind::QueueFull => tonic::Code::ResourceExhausted,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Timeout => tonic::Code::DeadlineExceeded,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }
}

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ServeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ServeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ServeError {
        ServeError {
            kind,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> ServeError {
        ServeError::new(ErrorKind::BadRequest, message)
    }
    pub fn internal(message: impl Into<String>) -> ServeError {
        ServeError::new(ErrorKind::Internal, message)
    }

    /// Maps a runtime error: input and data errors are the caller's, the rest are ours.
    pub fn from_runtime(e: kiln_runtime::Error) -> ServeError {
        match e {
            kiln_runtime::Error::Input(_) | kiln_runtime::Error::Node { .. } => {
                ServeError::bad(e.to_string())
            }
            other => ServeError::internal(other.to_string()),
        }
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> tonic::Status {
        tonic::Status::new(e.kind.grpc_code(), e.message)
    }
}

pub type SResult<T> = Result<T, ServeError>;
