//! Headless Chromium (Debian's chromium and chromium-driver) driven over
//! WebDriver by fantoccini: chromedriver on a free loopback port with a
//! fresh profile, both gone on drop.
//!
//! Set `VPNNAT_SCREENSHOT_DIR` to keep the screenshots tests take.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use crate::prereq::skip_or_fail;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long an element may take to appear or to show a text.
const WAIT: Duration = Duration::from_secs(15);

/// Whether Chromium and chromedriver are installed (the CI rule of
/// [`crate::prereq`] for a missing one).
pub fn require_browser() -> bool {
    for p in [CHROMIUM, CHROMEDRIVER] {
        if !std::path::Path::new(p).is_file() {
            skip_or_fail(&format!(
                "needs {p} (apt-get install chromium chromium-driver)"
            ));
            return false;
        }
    }
    true
}

/// A free TCP port on loopback (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver and one browser session; both go away on drop.
pub struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless session with a window of
    /// `width` × `height`.
    pub async fn start(width: u32, height: u32) -> Self {
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "chromedriver: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Self {
            driver,
            client: Some(client),
            _profile: profile,
        }
    }

    /// The WebDriver session.
    pub fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Ends the session.
    pub async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }

    /// The element `css` once it is in the page.
    pub async fn wait_for(&self, css: &str) -> Element {
        self.c()
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} did not appear: {e}"))
    }

    /// The element `css` once it is displayed.
    pub async fn visible(&self, css: &str) -> Element {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(e) = self.c().find(Locator::Css(css)).await
                && e.is_displayed().await.unwrap_or(false)
            {
                return e;
            }
            assert!(Instant::now() < deadline, "{css} never became visible");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of `css` once it contains `want`.
    pub async fn wait_text(&self, css: &str, want: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = match self.c().find(Locator::Css(css)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.contains(want) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css}: {text:?} never contained {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a screenshot as `name.png` in `VPNNAT_SCREENSHOT_DIR` (if set).
    pub async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("VPNNAT_SCREENSHOT_DIR") {
            let png = self.c().screenshot().await.unwrap();
            std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    /// Replaces the text of the displayed field `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.visible(css).await;
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// Selects `value` in the displayed `<select>` `css`.
    pub async fn select(&self, css: &str, value: &str) {
        self.visible(css)
            .await
            .select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("{css}={value}: {e}"));
    }
}
