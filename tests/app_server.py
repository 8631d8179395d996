"""Helpers of the app's browser tests: the `diffattn app` server as a subprocess on tiny models, Debian's Chromium
driven by Playwright, and small page actions (choose in a dropdown, fill a box, wait for a status)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("DIFFATTN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-extensions", "--no-first-run", "--mute-audio",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python -m diffattn.cli app ...` in a subprocess; `url` once it answers."""

    def __init__(self, video_model: str, image_model: str, out_dir: str, log_path: str,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.out_dir = out_dir
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (open for the life of the server; closed in stop())
        cmd = [sys.executable, "-m", "diffattn.cli", "app", "--port", str(self.port), "--device", "cpu",
               "--video-model", video_model, "--image-model", image_model, "--out-dir", out_dir, *extra_args]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the app did not answer on {self.url} within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text()[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def require_chromium() -> str:
    """The Chromium binary, or a failure that says how to install it (never a silent skip)."""
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(
            f"Chromium is missing at {CHROMIUM}: the app's browser tests need it. Install Debian's package "
            "(`sudo apt-get install -y chromium`, as the README's test command does when it is missing) or set "
            "DIFFATTN_CHROMIUM to a Chromium binary."
        )
    return CHROMIUM


# ---- page actions ----------------------------------------------------------------------------------------------
def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in the Gradio dropdown with `elem_id`."""
    if page.locator(f"#{elem_id} input").input_value() == value:
        return
    page.locator(f"#{elem_id} input").click()
    page.locator(f'li[role="option"][aria-label="{value}"]').click()
    page.wait_for_function(
        "([id, v]) => document.querySelector('#' + id + ' input').value === v", arg=[elem_id, value]
    )


def dropdown_options(page, elem_id: str) -> list[str]:
    """The entries the Gradio dropdown with `elem_id` offers (opens and closes it)."""
    page.locator(f"#{elem_id} input").click()
    options = page.locator('li[role="option"]')
    options.first.wait_for()
    labels = [options.nth(i).get_attribute("aria-label") for i in range(options.count())]
    page.keyboard.press("Escape")
    options.first.wait_for(state="detached")
    return labels


def fill(page, elem_id: str, text: str) -> None:
    """Type into the textbox or number box with `elem_id` (the value is sent when the next event runs)."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.blur()


def status_text(page, elem_id: str) -> str:
    """The message in a status box (without Gradio's progress overlay)."""
    box = page.locator(f"#{elem_id} .diffattn-ok, #{elem_id} .diffattn-error")
    return box.first.inner_text() if box.count() else ""


def click_and_wait(page, button_id: str, status_id: str, timeout_ms: int = 60000) -> str:
    """Click `button_id`, then wait until the status box `status_id` shows a new result or error (not the text it
    had before, not "Ready." or "Running"); returns the new text."""
    before = status_text(page, status_id)
    page.locator(f"#{button_id}").click()
    page.wait_for_function(
        """([id, before]) => {
            const el = document.querySelector('#' + id + ' .diffattn-ok, #' + id + ' .diffattn-error');
            if (!el) return false;
            const text = el.innerText.trim();
            return text !== before.trim() && text !== 'Ready.' && !text.startsWith('Running') && text !== '';
        }""",
        arg=[status_id, before], timeout=timeout_ms,
    )
    return status_text(page, status_id)


def screenshot(page, name: str) -> str:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"app-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return str(path)
