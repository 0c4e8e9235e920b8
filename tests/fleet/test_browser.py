"""What a user does first: open the chat page in a real browser and talk over wss."""

from __future__ import annotations

import re
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


def test_two_browsers_on_two_hosts_share_a_room(
    fleet: localfleet.Fleet, browser: webdriver.Chrome, second_browser: webdriver.Chrome
) -> None:
    """Browsers on fleet1 and fleet2 in one room see each other's messages; each page names
    the host and instance serving it and the room's member count across the fleet."""
    pages = list(zip(fleet.app_servers[:2], (browser, second_browser), strict=True))
    for host, driver in pages:
        driver.get(f"https://{host.address}/?room=two-hosts")
        wait = WebDriverWait(driver, 20)
        wait.until(
            expected_conditions.text_to_be_present_in_element((By.ID, "status"), "connected")
        )
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "served-by"), ":"))
        served_by = driver.find_element(By.ID, "served-by").text
        assert re.fullmatch(rf"{host.name}:800[12]", served_by), served_by
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
    # One leaves: the other page's count follows.
    second_browser.get("about:blank")
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "members").text == "1")
