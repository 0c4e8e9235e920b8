"""What a user does first: open the chat page in a real browser and talk over wss."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
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

# Flags for a closed network, as root, with no screen (../shared: Chromium's background
# services would otherwise keep trying to reach the internet).
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
def browser(deployed: object) -> Iterator[webdriver.Chrome]:
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


def test_chat_page_over_https_round_trips_a_message_over_wss(
    fleet: localfleet.Fleet, browser: webdriver.Chrome
) -> None:
    """The chat page loads over verified https, connects over wss, and shows a sent message."""
    host = fleet.app_servers[0]
    browser.get(f"https://{host.address}/?room=browser-test")
    wait = WebDriverWait(browser, 20)
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "connected"))
    assert (
        browser.find_element(By.ID, "status").text
        == f"connected to wss://{host.address}/ws/browser-test"
    )
    browser.find_element(By.ID, "message").send_keys("hello from chromium")
    browser.find_element(By.ID, "send").click()
    wait.until(
        expected_conditions.text_to_be_present_in_element(
            (By.ID, "messages"), "hello from chromium"
        )
    )
    # The page really came over TLS that the browser accepted (no interstitial).
    assert browser.execute_script("return location.protocol") == "https:"
