//! Why the rules cannot read a request: the request is then refused, never guessed at.

/// A part of the request a rule must read but cannot: the request is refused, never guessed at.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum RewriteError {
    #[error("body has a content encoding that cannot be inspected")]
    Encoded,
    #[error("body does not decode as its Content-Encoding says")]
    BadEncoding,
    #[error("body over max_body_bytes once decoded")]
    TooLarge,
    #[error("body is not valid JSON")]
    NotJson,
    #[error("JSON body has a duplicate object key")]
    DuplicateKey,
    #[error("JSON body has an object key with a control character")]
    BadKey,
    #[error("body is not a Sentry envelope as its Content-Type says")]
    NotEnvelope,
    #[error("Sentry envelope has an item the rules cannot read")]
    EnvelopeItem,
    #[error("form body cannot be read unambiguously")]
    AmbiguousForm,
    #[error("multipart/form-data body cannot be read unambiguously")]
    AmbiguousMultipart,
    #[error("query string cannot be read unambiguously")]
    AmbiguousQuery,
    /// A header replacement that is not a valid header value (a loaded policy has none).
    #[error("a replacement is not a valid header value")]
    BadReplacement,
}
