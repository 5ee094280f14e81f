//! Anthropic's Messages API as an adapter over the one internal request: [`request`] parses its wire
//! shapes (typed, every error naming its field) into [`crate::openai::ValidChatRequest`], the request
//! every API turns into a job; [`response`] is what the front end renders back.

pub mod request;
pub mod response;
