"""A third-party WHIP client publishes to the real server: Debian's simple-whip-client
(GStreamer webrtcbin + libnice + libsoup2) sends a live 440 Hz tone for a few seconds.

Two things stand between Debian 12's package and a loopback-only test run, both on
the client's side, both handled by a tiny shim preloaded into the client only:
- libnice links libgupnp-igd, which pulls in libsoup3; the client links libsoup2,
  and libsoup aborts a process holding both ("libsoup2 symbols detected. Using
  libsoup2 and libsoup3 in the same process is not supported."). The shim stands in
  for libgupnp-igd (same soname, UPnP off: libnice copes with no IGD object).
- libnice never gathers on loopback, and tests/run gives the suite only ``lo``:
  the shim wraps ``nice_interfaces_get_local_ips`` to include loopback addresses.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import running_server

from server.config import ServerConfig

WHIP_CLIENT = shutil.which("whip-client")

pytestmark = pytest.mark.skipif(
    WHIP_CLIENT is None,
    reason="Debian's simple-whip-client (whip-client) is not installed (make test installs it)",
)

# -A takes a partial pipeline ending in RTP caps; the client appends "! sendonly." (its webrtcbin).
# No -V: audio only. audiotestsrc's default volume 0.8 gives a sine of RMS ~0.57.
AUDIO_PIPELINE = (
    "audiotestsrc is-live=true wave=sine freq=440 ! audioconvert ! audioresample ! queue ! opusenc ! "
    "rtpopuspay pt=111 ! queue ! application/x-rtp,media=audio,encoding-name=OPUS,payload=111"
)

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

/* libgupnp-igd, as much as libnice uses: no IGD (libnice then skips UPnP). */
void *gupnp_simple_igd_thread_new(void) { return NULL; }
unsigned long gupnp_simple_igd_get_type(void) { return 0; }
void gupnp_simple_igd_add_port(void) {}
void gupnp_simple_igd_remove_port_local(void) {}

/* libnice gathers host candidates from this, always asking for no loopback. */
void *nice_interfaces_get_local_ips(int include_loopback) {
    void *libnice = dlopen("libnice.so.10", RTLD_LAZY | RTLD_NOLOAD);
    void *(*real)(int) = libnice ? (void *(*)(int))dlsym(libnice, "nice_interfaces_get_local_ips") : NULL;
    (void)include_loopback;
    return real ? real(1) : NULL;
}
"""

CHUNKS_WANTED = 10  # 2 s of audio in 200 ms chunks
DEADLINE_S = 15.0


@pytest.fixture(scope="module")
def client_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler (cc) is needed to build the shim simple-whip-client runs with")
    build = tmp_path_factory.mktemp("whip-shim")
    (build / "shim.c").write_text(SHIM_SOURCE)
    shim = build / "libgupnp-igd-1.0.so.4"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-Wl,-soname,libgupnp-igd-1.0.so.4", "-o", str(shim), str(build / "shim.c")],
        check=True, capture_output=True, timeout=60,
    )
    return shim


def stop(client: subprocess.Popen[bytes]) -> None:
    """SIGINT (the client then DELETEs its resource), then SIGKILL to its process group."""
    if client.poll() is None:
        client.send_signal(signal.SIGINT)
        try:
            client.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass
    if client.poll() is None:
        os.killpg(client.pid, signal.SIGKILL)  # its own group: start_new_session=True
        client.wait(5)


def test_simple_whip_client_publishes_a_tone_the_server_hears(client_shim: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "whip-client.log"
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [str(client_shim), os.environ.get("LD_PRELOAD")])))
    config = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], capacity=4)
    with running_server(config) as server, open(log_path, "wb") as log, httpx.Client(base_url=server.url) as http:
        client = subprocess.Popen(
            [WHIP_CLIENT, "-o", "-u", f"{server.url}/v1/sessions", "-A", AUDIO_PIPELINE],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

        def client_log() -> str:
            return log_path.read_text(errors="replace")[-4000:]

        session_id, stats = None, {}
        try:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline:
                time.sleep(0.25)
                if session_id is None:
                    found = re.search(r"Resource URL: \S*/v1/sessions/([\w-]+)", log_path.read_text(errors="replace"))
                    session_id = found and found.group(1)
                if session_id is not None:
                    response = http.get(f"/v1/sessions/{session_id}")
                    if response.status_code != 200:
                        pytest.fail(f"session {session_id} is gone ({response.status_code} {response.text});"
                                    f" client log:\n{client_log()}")
                    stats = response.json()
                    if stats["chunks_in"] >= CHUNKS_WANTED:
                        break
                if client.poll() is not None:
                    pytest.fail(f"whip-client exited ({client.returncode}) before the server heard"
                                f" {CHUNKS_WANTED} chunks; session: {stats}; client log:\n{client_log()}")
            assert session_id is not None, f"no session was created; client log:\n{client_log()}"
            assert stats["connection_state"] == "connected", stats
            assert stats["chunks_in"] >= CHUNKS_WANTED, f"session: {stats}; client log:\n{client_log()}"
            assert stats["frames_in"] >= 5 * CHUNKS_WANTED, stats  # 20 ms Opus frames
            assert stats["input_rms_max"] > 0.1, f"the tone arrived as silence: {stats}"
        finally:
            stop(client)

        # On SIGINT the client DELETEs its resource: the slot is free again.
        gone_by = time.monotonic() + 5
        while len(server.app.state.registry) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert len(server.app.state.registry) == 0, f"the session outlived its client; client log:\n{client_log()}"
