//! The chat page at `/`: one HTML, one CSS and one JS file (plus the microphone's AudioWorklet),
//! compiled into the binary. The page talks to the same `/v1/*` API as any client; it needs nothing
//! from the server beyond these static files, served with a Content-Security-Policy that allows only
//! this origin (and `blob:`/`data:` for the previews of attached media).
//!
//! The page's own tests run it in headless Chromium: `tests/ui_browser.rs` and `tests/ui/`.

use warp::http::{header, HeaderValue};
use warp::reply::Response;
use warp::{Filter, Rejection};

const INDEX_HTML: &str = include_str!("ui/index.html");
const STYLE_CSS: &str = include_str!("ui/style.css");
const APP_JS: &str = include_str!("ui/app.js");
const RECORDER_JS: &str = include_str!("ui/recorder.js");

/// Scripts, styles and requests from this origin only; media previews are `blob:` URLs, the API's
/// images travel as `data:` URLs; nothing may frame the page.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = Response::new(body.into());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Revalidated on each load so that a new binary's page is never mixed with an old script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /` and the page's assets under `/ui/`.
pub fn routes() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let index = warp::path::end().map(|| asset(INDEX_HTML, "text/html; charset=utf-8"));
    let css = warp::path!("ui" / "style.css").map(|| asset(STYLE_CSS, "text/css; charset=utf-8"));
    let js = warp::path!("ui" / "app.js").map(|| asset(APP_JS, "text/javascript; charset=utf-8"));
    let rec = warp::path!("ui" / "recorder.js")
        .map(|| asset(RECORDER_JS, "text/javascript; charset=utf-8"));
    warp::get().and(index.or(css).unify().or(js).unify().or(rec).unify())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_page_and_its_assets_with_a_csp() {
        let r = warp::test::request().path("/").reply(&routes()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(
            r.headers()["content-security-policy"],
            CONTENT_SECURITY_POLICY
        );
        let html = std::str::from_utf8(r.body()).unwrap();
        // Every asset the page names is served, and it names nothing from elsewhere.
        for path in ["/ui/style.css", "/ui/app.js"] {
            assert!(html.contains(path), "{path}");
        }
        for path in ["/ui/style.css", "/ui/app.js", "/ui/recorder.js"] {
            let r = warp::test::request().path(path).reply(&routes()).await;
            assert_eq!(r.status(), 200, "{path}");
            assert!(!r.body().is_empty());
        }
        for text in [INDEX_HTML, STYLE_CSS, APP_JS, RECORDER_JS] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
        let r = warp::test::request()
            .path("/ui/missing.js")
            .reply(&routes())
            .await;
        assert_eq!(r.status(), 404);
        let r = warp::test::request()
            .method("POST")
            .path("/")
            .reply(&routes())
            .await;
        assert_eq!(r.status(), 405);
    }
}
