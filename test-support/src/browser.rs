//! Headless Chromium (Debian's chromium and chromium-driver) driven over
//! WebDriver by fantoccini: chromedriver on a free loopback port with a
//! fresh profile, both gone on drop.
//!
//! Screenshots go to `VPNNAT_SCREENSHOT_DIR`, or else to `screenshots/`
//! in the cargo target directory. The accessibility check runs axe-core
//! (fetched by `scripts/setup.sh`) inside the page.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use crate::prereq::skip_or_fail;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Where `scripts/setup.sh` puts axe-core (`VPNNAT_AXE_JS` overrides it).
pub const AXE_JS: &str = "/var/cache/vpnnat-test/axe-core-4.10.2/axe.min.js";
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
        Self::start_with(width, height, json!({})).await
    }

    /// [`Self::start`] with the profile's permission for desktop
    /// notifications already given (as a technician who allowed them once).
    pub async fn start_allowing_notifications(width: u32, height: u32) -> Self {
        Self::start_with(
            width,
            height,
            json!({ "profile.default_content_setting_values.notifications": 1 }),
        )
        .await
    }

    async fn start_with(width: u32, height: u32, prefs: serde_json::Value) -> Self {
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
                "prefs": prefs,
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

    /// Clicks `css` once it is displayed. The pages re-render what they
    /// poll, so the element found may be replaced before the click lands
    /// ("stale element reference"): then it is found and clicked again. A
    /// click that failed did not happen, so nothing is clicked twice.
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.visible(css).await.click().await {
                Ok(()) => return,
                Err(e) => assert!(Instant::now() < deadline, "{css} could not be clicked: {e}"),
            }
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

    /// Saves a screenshot as `name.png` in `VPNNAT_SCREENSHOT_DIR`, or else
    /// in `screenshots/` of the target directory the test runs from.
    pub async fn screenshot(&self, name: &str) {
        let dir = std::env::var_os("VPNNAT_SCREENSHOT_DIR")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                // target/debug/deps/<test binary>
                let exe = std::env::current_exe().ok()?;
                Some(exe.parent()?.parent()?.parent()?.join("screenshots"))
            });
        if let Some(dir) = dir {
            let png = self.c().screenshot().await.unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }

    /// Asserts that the page is no wider than the window (nothing to
    /// scroll sideways); `what` names the state in the message.
    pub async fn assert_no_horizontal_overflow(&self, what: &str) {
        let v = self
            .c()
            .execute(
                "const d = document.documentElement; \
                 return [d.scrollWidth, window.innerWidth];",
                vec![],
            )
            .await
            .unwrap();
        let (scroll, inner) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
        assert!(
            scroll <= inner,
            "{what}: the page is {scroll} px wide in a {inner} px window"
        );
    }

    /// Runs axe-core in the page and returns its serious and critical
    /// violations as `rule: targets` lines (empty when there are none), or
    /// `None` when axe-core is not installed (skipped outside CI).
    pub async fn axe_serious(&self) -> Option<Vec<String>> {
        let path = std::env::var_os("VPNNAT_AXE_JS").map_or_else(
            || std::path::PathBuf::from(AXE_JS),
            std::path::PathBuf::from,
        );
        let Ok(source) = std::fs::read_to_string(&path) else {
            skip_or_fail(&format!(
                "the accessibility check needs {} (scripts/setup.sh fetches it)",
                path.display()
            ));
            return None;
        };
        // WebDriver scripts run outside the page's Content Security Policy.
        self.c()
            .execute(&format!("{source}\n;return null;"), vec![])
            .await
            .unwrap();
        let v = self
            .c()
            .execute_async(
                "const done = arguments[arguments.length - 1]; \
                 axe.run(document, { resultTypes: ['violations'] }).then((r) => done( \
                   r.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical') \
                     .map((v) => v.id + ': ' + v.nodes.map((n) => n.target.join(' ')).join(', ')))) \
                   .catch((e) => done(['axe failed: ' + e]));",
                vec![],
            )
            .await
            .unwrap();
        Some(
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap_or_default().to_owned())
                .collect(),
        )
    }

    /// Asserts that axe-core finds no serious or critical violation.
    pub async fn assert_accessible(&self, what: &str) {
        if let Some(v) = self.axe_serious().await {
            assert!(v.is_empty(), "{what}: accessibility violations: {v:#?}");
        }
    }

    /// The `id` (or else the text) of the focused element.
    pub async fn focused(&self) -> String {
        self.c()
            .execute(
                "const a = document.activeElement; \
                 return a ? (a.id || (a.dataset && a.dataset.key) || a.textContent) : '';",
                vec![],
            )
            .await
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_owned()
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
