//! The closed set of error classes that travel on the wire.
//!
//! Each layer has its own `thiserror` enum and classifies its errors once, where the cause is
//! understood (`fn class(&self) -> ErrorClass`). The class travels in `error` frames; exactly one place,
//! [`ErrorClass::http_status`] with [`ErrorClass::openai_type`], turns it into an HTTP status and the
//! OpenAI error body.

use serde::{Deserialize, Serialize};

/// Why a request failed, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The request is malformed or has invalid values (400).
    InvalidRequest,
    /// The prompt plus `max_tokens` does not fit the model's context (400).
    ContextLengthExceeded,
    /// Missing or wrong API key (401).
    Unauthorized,
    /// The requested model is not served (404).
    ModelNotFound,
    /// Another named resource (a stored response) does not exist, or not for this key (404).
    NotFound,
    /// The body or a media item is too large (413).
    PayloadTooLarge,
    /// Well-formed JSON that cannot be processed, e.g. undecodable media (422).
    Unprocessable,
    /// Too many requests queued (429).
    Overloaded,
    /// No worker answered in time, or a stream stopped without an end (504 before any output).
    Timeout,
    /// The request was cancelled (client gone, or the server shutting down).
    Cancelled,
    /// No worker or broker available (503).
    Unavailable,
    /// A bug or an inference failure (500).
    Internal,
}

impl ErrorClass {
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::ContextLengthExceeded => 400,
            Self::Unauthorized => 401,
            Self::ModelNotFound | Self::NotFound => 404,
            Self::PayloadTooLarge => 413,
            Self::Unprocessable => 422,
            Self::Overloaded => 429,
            Self::Cancelled => 499,
            Self::Internal => 500,
            Self::Unavailable => 503,
            Self::Timeout => 504,
        }
    }

    /// The OpenAI `error.type` string.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::ContextLengthExceeded
            | Self::PayloadTooLarge
            | Self::Unprocessable => "invalid_request_error",
            Self::ModelNotFound | Self::NotFound => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::Overloaded => "rate_limit_error",
            Self::Timeout | Self::Unavailable | Self::Cancelled | Self::Internal => "server_error",
        }
    }

    /// The OpenAI `error.code` string, where OpenAI defines one.
    pub fn openai_code(self) -> Option<&'static str> {
        match self {
            Self::ModelNotFound => Some("model_not_found"),
            Self::ContextLengthExceeded => Some("context_length_exceeded"),
            Self::Unauthorized => Some("invalid_api_key"),
            Self::PayloadTooLarge => Some("payload_too_large"),
            Self::Overloaded => Some("rate_limit_exceeded"),
            Self::Timeout => Some("timeout"),
            Self::Unavailable => Some("service_unavailable"),
            Self::Cancelled => Some("cancelled"),
            Self::Unprocessable => Some("unprocessable_entity"),
            Self::InvalidRequest | Self::NotFound | Self::Internal => None,
        }
    }
}

/// An error with its class, a message for the client, and the request field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ClassifiedError {
    pub class: ErrorClass,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl ClassifiedError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            param: None,
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::InvalidRequest,
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
}
