"""What a user does first: open the chat page in a real browser and talk over wss."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

import localfleet
from localfleet.demo import ca_file
from tests.fleet.releases import host_of, per_release

# Flags for a closed network, as root, with no screen (../shared: Chromium's background
# services would otherwise keep trying to reach the internet).
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> Iterator[webdriver.Chrome]:
    """Headless Debian Chromium whose certificate store trusts the demo CA (and only that)."""
    home = Path(tempfile.mkdtemp(prefix="wsfleet-browser-"))
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-d", f"sql:{nssdb}", "-A", "-n", "wsfleet demo CA", "-t", "C,,",
         "-i", str(ca_file())],
        check=True,
    )  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}"]:
        options.add_argument(flag)
    service = Service("/usr/bin/chromedriver", env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def browser(deployed: object) -> Iterator[webdriver.Chrome]:
    """One browser."""
    yield from chromium()


@pytest.fixture
def second_browser(deployed: object) -> Iterator[webdriver.Chrome]:
    """Another browser, with a profile of its own."""
    yield from chromium()


# The protocol Chromium loads the page with: HTTP/2 where nginx offers it (1.25.1+, so
# Debian 13's 1.26; nginx_http2 is on by default), HTTP/1.1 on Debian 12's 1.22.
PAGE_PROTOCOL = {"trixie": "h2", "bookworm": "http/1.1"}


@per_release
def test_chat_page_over_https_round_trips_a_message_over_wss(
    fleet: localfleet.Fleet, browser: webdriver.Chrome, release: str
) -> None:
    """The chat page loads over verified https (HTTP/2 where nginx offers it), connects
    over wss (an HTTP/1.1 handshake on a connection of its own), and shows a sent message."""
    host = host_of(fleet, release)
    room = f"browser-test-{release}"
    browser.get(f"https://{host.address}/?room={room}")
    wait = WebDriverWait(browser, 20)
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "connected"))
    assert (
        browser.find_element(By.ID, "status").text == f"connected to wss://{host.address}/ws/{room}"
    )
    protocol = browser.execute_script(
        "return performance.getEntriesByType('navigation')[0].nextHopProtocol"
    )
    assert protocol == PAGE_PROTOCOL[release]
    browser.find_element(By.ID, "message").send_keys("hello from chromium")
    browser.find_element(By.ID, "send").click()
    wait.until(
        expected_conditions.text_to_be_present_in_element(
            (By.ID, "messages"), "hello from chromium"
        )
    )
    # The page really came over TLS that the browser accepted (no interstitial).
    assert browser.execute_script("return location.protocol") == "https:"
    # nginx's own record of the page: over that protocol. (The WebSocket cannot have come
    # over HTTP/2: nginx does not offer it, RFC 8441; it connected, so over HTTP/1.1.)
    page = "HTTP/2.0" if protocol == "h2" else "HTTP/1.1"
    log = host.ssh(f"grep -F '?room={room} ' /var/log/nginx/access.log").stdout
    assert f'"GET /?room={room} {page}" 200' in log, log


def test_two_browsers_on_two_hosts_share_a_room(
    fleet: localfleet.Fleet, browser: webdriver.Chrome, second_browser: webdriver.Chrome
) -> None:
    """Browsers on fleet1 and fleet2 in one room see each other's messages, each its own
    acknowledged (no line left pending); each page names the host and instance serving it
    and the room's member count across the fleet; a page opened again shows the room's
    latest messages from its history."""
    pages = list(zip(fleet.app_servers[:2], (browser, second_browser), strict=True))
    room = f"two-hosts-{time.monotonic_ns()}"  # new each run: its history starts empty
    for host, driver in pages:
        driver.get(f"https://{host.address}/?room={room}")
        wait = WebDriverWait(driver, 20)
        wait.until(
            expected_conditions.text_to_be_present_in_element((By.ID, "status"), "connected")
        )
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "served-by"), ":"))
        served_by = driver.find_element(By.ID, "served-by").text
        assert re.fullmatch(rf"{host.name}:(80|81)0[12]", served_by), served_by
    for _host, driver in pages:
        WebDriverWait(driver, 5).until(lambda d: d.find_element(By.ID, "members").text == "2")
    for index, (host, driver) in enumerate(pages):
        driver.find_element(By.ID, "message").send_keys(f"hello from {host.name} ({index})")
        driver.find_element(By.ID, "send").click()
    for _host, driver in pages:
        for index, (host, _driver) in enumerate(pages):
            WebDriverWait(driver, 10).until(
                expected_conditions.text_to_be_present_in_element(
                    (By.ID, "messages"), f"hello from {host.name} ({index})"
                )
            )
    for _host, driver in pages:
        WebDriverWait(driver, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".pending"))
    sent = [f"hello from {host.name} ({index})" for index, (host, _) in enumerate(pages)]
    second_browser.get(f"https://{pages[1][0].address}/?room={room}")
    WebDriverWait(second_browser, 20).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages li:not(.note)")) == 2
    )
    shown = [e.text for e in second_browser.find_elements(By.CSS_SELECTOR, "#messages li")]
    assert sorted(shown[:2]) == sorted(sent), shown
    assert re.fullmatch(r"connected to \S+, the latest 2 messages", shown[2]), shown
    # One leaves: the other page's count follows.
    second_browser.get("about:blank")
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "members").text == "1")
