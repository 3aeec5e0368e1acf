//! The response future of [`ShardRouterService`](super::ShardRouterService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tracing::instrument::Instrumented;
use tracing::Instrument;

pin_project! {
    /// The inner service's response, or the layer's own rejection.
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner {
            #[pin] future: Instrumented<F>,
            // Where the handle records its writes' read-your-writes token.
            written: Option<crate::db::WrittenSlot>,
            // The request's statements and database time, for the span.
            tally: Option<crate::db::RequestTally>,
        },
        Rejected { response: Option<Response<B>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(super) fn inner(
        future: F,
        span: tracing::Span,
        written: Option<crate::db::WrittenSlot>,
        tally: Option<crate::db::RequestTally>,
    ) -> Self {
        ResponseFuture {
            kind: Kind::Inner {
                future: future.instrument(span),
                written,
                tally,
            },
        }
    }

    pub(super) fn rejected(response: Response<B>) -> Self {
        ResponseFuture {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner {
                mut future,
                written,
                tally,
            } => {
                let mut result = std::task::ready!(future.as_mut().poll(cx));
                if let Some(tally) = tally.as_ref() {
                    use std::sync::atomic::Ordering::Relaxed;
                    let span = future.span();
                    span.record("statements", tally[0].load(Relaxed));
                    span.record("db_time_us", tally[1].load(Relaxed));
                }
                if let (Ok(response), Some(slot)) = (&mut result, written.as_ref()) {
                    let token = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if let Some(value) =
                        token.and_then(|t| http::HeaderValue::from_str(&t.to_string()).ok())
                    {
                        response.headers_mut().insert(super::TOKEN.clone(), value);
                    }
                }
                Poll::Ready(result)
            }
            KindProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
