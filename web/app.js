// microturn web client: microphone -> WebRTC -> server; model voice back; events on
// the "events" data channel. Plain ES module, no build step.

const $ = (id) => document.getElementById(id);
const MAX_LOG_ENTRIES = 200;
const STATS_PERIOD_MS = 1000;
const PING_PERIOD_MS = 5000;

// Shared with the browser test (and handy in the console).
const state = {
  status: "idle",
  sessionUrl: null,
  eventCounts: {},
  turns: 0,
  lastStepMs: null,
  stats: {},
  errors: [],
  transcript: "",
};
window.microturn = state;

let pc = null;
let channel = null;
let microphone = null;
let timers = [];

function setStatus(status) {
  state.status = status;
  $("state").textContent = status;
  $("state").dataset.state = status;
  const busy = status !== "idle" && status !== "closed" && status !== "failed";
  $("connect").disabled = busy;
  $("disconnect").disabled = !busy;
}

function log(text, kind = "") {
  const item = document.createElement("li");
  item.textContent = `${new Date().toISOString().slice(11, 23)}  ${text}`;
  if (kind) item.className = kind;
  const list = $("log");
  list.prepend(item);
  while (list.children.length > MAX_LOG_ENTRIES) list.lastChild.remove();
}

function randomHex(bytes) {
  const values = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
}

// W3C trace context: the server's "session" span continues this trace.
function newTraceparent() {
  return `00-${randomHex(16)}-${randomHex(8)}-01`;
}

function waitForIceGathering(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (peer.iceGatheringState === "complete") {
        peer.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    peer.addEventListener("icegatheringstatechange", check);
  });
}

function onEvent(message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    log(`unparsable event: ${message.data}`, "error");
    return;
  }
  state.eventCounts[event.type] = (state.eventCounts[event.type] || 0) + 1;
  if (event.type === "turn") {
    state.turns += 1;
    state.lastStepMs = event.step_ms;
    $("stat-turns").textContent = String(event.turn + 1);
    $("stat-step").textContent = `${event.step_ms.toFixed(1)} ms (batch ${event.batch})`;
    return; // five a second: counted, not logged
  }
  if (event.type === "transcript.delta") {
    state.transcript += event.text;
    $("transcript").textContent = state.transcript.slice(-2000);
    return;
  }
  if (event.type === "session.ready") showNotice(event);
  if (event.type === "pong" && typeof event.t === "number") {
    log(`pong: data-channel round trip ${(performance.now() - event.t).toFixed(1)} ms`);
    return;
  }
  if (event.type === "error") state.errors.push(event);
  log(`${event.type} ${JSON.stringify(event)}`, event.type === "error" ? "error" : "");
}

// Say plainly what is answering: users should not mistake babble for a bug.
function showNotice(ready) {
  const notice = $("notice");
  if (ready.engine === "echo") {
    notice.textContent = "Echo engine (diagnostic): you hear yourself one micro-turn (200 ms) later.";
  } else if (ready.weights === "random") {
    notice.textContent =
      "This interaction model has random weights: it makes noise, not conversation, until a trained checkpoint is served (microturn serve --checkpoint DIR).";
  } else {
    notice.textContent = `Model weights: ${ready.weights}`;
  }
  notice.hidden = false;
}

function sendEvent(event) {
  if (channel && channel.readyState === "open") channel.send(JSON.stringify(event));
}

async function updateStats() {
  if (!pc) return;
  const report = await pc.getStats();
  const stats = {};
  report.forEach((entry) => {
    if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded") {
      stats.rttMs = entry.currentRoundTripTime * 1000;
    } else if (entry.type === "inbound-rtp" && entry.kind === "audio") {
      stats.packetsReceived = entry.packetsReceived;
      stats.packetsLost = entry.packetsLost;
      stats.jitterMs = entry.jitter * 1000;
      stats.concealedSamples = entry.concealedSamples;
      stats.totalAudioEnergy = entry.totalAudioEnergy;
    } else if (entry.type === "outbound-rtp" && entry.kind === "audio") {
      stats.packetsSent = entry.packetsSent;
    }
  });
  state.stats = stats;
  const fmt = (value, unit) => (value === undefined || Number.isNaN(value) ? "–" : `${value.toFixed(1)} ${unit}`);
  $("stat-rtt").textContent = fmt(stats.rttMs, "ms");
  $("stat-jitter").textContent = fmt(stats.jitterMs, "ms");
  $("stat-packets-in").textContent = `${stats.packetsReceived ?? "–"} / ${stats.packetsLost ?? "–"}`;
  $("stat-packets-out").textContent = `${stats.packetsSent ?? "–"}`;
}

async function connect() {
  setStatus("connecting");
  try {
    // Browser audio processing flattens speech the model should hear as it is;
    // echo cancellation stays on by default so the model does not hear itself.
    microphone = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: $("echo-cancellation").checked,
        noiseSuppression: false,
        autoGainControl: false,
        channelCount: 1,
      },
    });
    pc = new RTCPeerConnection({ iceServers: [] });
    pc.addTransceiver(microphone.getAudioTracks()[0], { direction: "sendrecv" });
    channel = pc.createDataChannel("events");
    channel.addEventListener("message", onEvent);
    channel.addEventListener("open", () => log("data channel open"));
    pc.addEventListener("track", (event) => {
      $("remote-audio").srcObject = event.streams[0] || new MediaStream([event.track]);
    });
    pc.addEventListener("connectionstatechange", () => {
      log(`connection ${pc.connectionState}`);
      if (pc.connectionState === "connected") setStatus("connected");
      if (pc.connectionState === "failed") disconnect("failed");
    });

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    const response = await fetch("/v1/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/sdp", traceparent: newTraceparent() },
      body: pc.localDescription.sdp,
    });
    if (response.status !== 201) {
      const body = await response.json().catch(() => ({}));
      throw new Error(`signalling failed: HTTP ${response.status} ${body.message || ""}`);
    }
    state.sessionUrl = response.headers.get("Location");
    log(`session ${state.sessionUrl}`);
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    timers.push(setInterval(updateStats, STATS_PERIOD_MS));
    timers.push(setInterval(() => sendEvent({ type: "ping", t: performance.now() }), PING_PERIOD_MS));
  } catch (error) {
    log(String(error), "error");
    state.errors.push({ type: "client", message: String(error) });
    await disconnect("failed");
  }
}

async function disconnect(finalStatus = "closed") {
  timers.forEach(clearInterval);
  timers = [];
  const url = state.sessionUrl;
  state.sessionUrl = null;
  if (url) await fetch(url, { method: "DELETE" }).catch(() => {});
  if (pc) pc.close();
  if (microphone) microphone.getTracks().forEach((track) => track.stop());
  pc = channel = microphone = null;
  setStatus(finalStatus);
}

$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", () => disconnect());
window.addEventListener("pagehide", () => {
  // keepalive lets the DELETE outlive the page; the server also notices the peer vanish.
  if (state.sessionUrl) fetch(state.sessionUrl, { method: "DELETE", keepalive: true });
});
setStatus("idle");
