// microturn web client: microphone -> WebRTC -> server; model voice back; events on
// the "events" data channel (docs/protocol.md). Plain ES modules, no build step.

import { TaskBoard } from "./tasks.js";
import { Timeline } from "./timeline.js";

const $ = (id) => document.getElementById(id);
const MAX_LOG_ENTRIES = 200;
const STATS_PERIOD_MS = 1000;
const PING_PERIOD_MS = 5000;

// What one session knows; each session starts from this.
function freshSessionState() {
  return {
    sessionUrl: null,
    eventCounts: {},
    turns: 0,
    lastStepMs: null,
    stats: {},
    errors: [],
    transcript: "",
    tasks: {}, // task_id -> last task event type
    iceRestarts: 0,
    restarting: false, // an ICE restart is in flight
    recording: false, // this session is being recorded (the server confirmed it)
  };
}

// Shared with the browser test (and handy in the console).
const state = {
  status: "idle",
  recordingAvailable: false, // the server offers recording (OPTIONS said so)
  ...freshSessionState(),
};
window.microturn = state;

let pc = null;
let channel = null;
let microphone = null;
let timers = [];
let attempt = 0; // a Disconnect during connect() abandons that attempt
let lastTyped = null; // the last text.input sent, put back in the box if it is refused

const timeline = new Timeline($("timeline"));
const taskBoard = new TaskBoard($("tasks"), (taskId) => sendEvent({ type: "task.cancel", task_id: taskId }));

function setStatus(status) {
  state.status = status;
  $("state").textContent = status;
  $("state").dataset.state = status;
  const busy = status !== "idle" && status !== "closed" && status !== "failed";
  $("connect").disabled = busy;
  $("disconnect").disabled = !busy;
  $("record").disabled = busy; // consent is given per session, before it starts
  $("recording-indicator").hidden = !(status === "connected" && state.recording);
}

// Recording is opt-in twice: the server must offer it, and the user must tick the box.
function showRecordingConsent(available) {
  state.recordingAvailable = available;
  $("record-consent").hidden = !available;
  if (!available) $("record").checked = false;
}

// Each session starts on a clean page: its counts, transcript, timeline and task cards.
// Task ids restart with every session, so a card left running from the last one could
// otherwise cancel this session's task of the same id.
function startFresh() {
  Object.assign(state, freshSessionState());
  $("transcript").textContent = "";
  for (const figure of document.querySelectorAll("section.stats dd")) figure.textContent = "–";
  timeline.clear();
  taskBoard.clear();
}

function setInputsEnabled(enabled) {
  for (const element of document.querySelectorAll("#text-form > *, #task-form > *")) element.disabled = !enabled;
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
  const select = $("task-tool");
  select.replaceChildren(
    ...Object.entries(ready.tools || {}).map(([name, description]) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      option.title = description;
      return option;
    }),
  );
}

const handlers = {
  "session.ready": (event) => {
    showNotice(event);
    setInputsEnabled(true);
    sendEvent({ type: "session.update", metrics_interval_ms: 1000 });
  },
  turn: (event) => {
    state.turns += 1;
    state.lastStepMs = event.step_ms;
    $("stat-turns").textContent = String(event.turn + 1);
    $("stat-step").textContent = `${event.step_ms.toFixed(1)} ms (batch ${event.batch})`;
    if (event.latency_ms != null) $("stat-latency").textContent = `${event.latency_ms.toFixed(1)} ms`;
    timeline.add(event);
  },
  "transcript.delta": (event) => {
    state.transcript += event.text;
    $("transcript").textContent = state.transcript.slice(-2000);
  },
  "task.created": (event) => taskBoard.created(event),
  "task.progress": (event) => taskBoard.progress(event),
  "task.done": (event) => taskBoard.finished(event, true),
  "task.failed": (event) => taskBoard.finished(event, false),
  "session.ending": (event) => {
    const why = event.reason === "server_shutdown" ? "the server is restarting" : "the session reached its time limit";
    const seconds = Math.max(0, Math.round((event.deadline_ms - Date.now()) / 1000));
    log(`session ending: ${why}; it closes within ${seconds} s — connect again to carry on`, "error");
  },
  pong: (event) => {
    if (typeof event.t === "number") log(`pong: data-channel round trip ${(performance.now() - event.t).toFixed(1)} ms`);
  },
};
// Frequent events are shown, not logged.
const QUIET = new Set(["turn", "transcript.delta", "task.progress", "metrics", "pong"]);

function onEvent(message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    log(`unparsable event: ${message.data}`, "error");
    return;
  }
  state.eventCounts[event.type] = (state.eventCounts[event.type] || 0) + 1;
  if (event.task_id) state.tasks[event.task_id] = event.type;
  if (event.type === "error") state.errors.push(event);
  if (event.type === "error" && event.code === "text_backlog" && lastTyped && !$("text-input").value) {
    $("text-input").value = lastTyped; // refused while the model reads what came before: send it again
  }
  if (event.type === "error" && event.code === "recording_failed") {
    state.recording = false; // the server stopped recording; the session goes on
    $("recording-indicator").hidden = true;
  }
  handlers[event.type]?.(event);
  if (!QUIET.has(event.type)) log(`${event.type} ${JSON.stringify(event)}`, event.type === "error" ? "error" : "");
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

// ?token=... on the page URL: sent as a bearer token (servers run with --auth-*).
const TOKEN = new URLSearchParams(location.search).get("token");
const AUTH = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};

/** What the server's OPTIONS answer says: STUN/TURN servers from its WHIP Link headers
 *  (RFC 9725 §4.6), and whether it can record sessions (Microturn-Recording: available). */
async function serverOptions() {
  const response = await fetch("/v1/sessions", { method: "OPTIONS", headers: AUTH }).catch(() => null);
  return {
    iceServers: iceServersFrom(response && response.headers.get("Link")),
    recording: Boolean(response && response.headers.get("Microturn-Recording") === "available"),
  };
}

function iceServersFrom(header) {
  if (!header) return [];
  const servers = [];
  for (const link of header.split(/,\s*(?=<)/)) {
    const url = link.match(/^<([^>]+)>/);
    if (!url || !/rel="ice-server"/.test(link)) continue;
    const param = (name) => (link.match(new RegExp(`${name}="([^"]*)"`)) || [])[1];
    const server = { urls: url[1] };
    if (param("username") !== undefined) {
      server.username = param("username");
      server.credential = param("credential");
    }
    servers.push(server);
  }
  return servers;
}

/** ICE restart the WHIP way (RFC 9725 §4.3.2): new credentials and candidates in a
 *  PATCH, the server's back in its answer; media and data channel carry on. */
async function restartIce() {
  // This session's connection and URL, held across the awaits: a hang-up and a new
  // session meanwhile must not get the old restart's offer or answer.
  const peer = pc;
  const url = state.sessionUrl;
  if (!peer || !url) return false;
  peer.restartIce();
  await peer.setLocalDescription(await peer.createOffer());
  await waitForIceGathering(peer);
  if (peer !== pc) return false;
  const offer = peer.localDescription.sdp;
  const pick = (sdp, re) => sdp.split("\r\n").filter((line) => re.test(line));
  const mid = pick(offer, /^a=mid:/)[0];
  const fragment = [
    ...pick(offer, /^a=ice-(ufrag|pwd):/).slice(0, 2), "m=audio 9 UDP/TLS/RTP/SAVPF 0", mid,
    ...pick(offer, /^a=candidate:/), "a=end-of-candidates", "",
  ].join("\r\n");
  const response = await fetch(url, {
    method: "PATCH",
    headers: { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*", ...AUTH },
    body: fragment,
  });
  if (response.status !== 200) throw new Error(`ICE restart refused: HTTP ${response.status}`);
  const answer = await response.text();
  if (peer !== pc) return false;
  const ufrag = pick(answer, /^a=ice-ufrag:/)[0];
  const pwd = pick(answer, /^a=ice-pwd:/)[0];
  const candidates = pick(answer, /^a=candidate:/);
  // The last answer with the server's new credentials and candidates in every m= section.
  const sections = peer.remoteDescription.sdp.split(/\r\n(?=m=)/).map((section, index) => {
    const lines = section.split("\r\n").filter((line) => line && !/^a=(ice-ufrag|ice-pwd|candidate|end-of-candidates)/.test(line));
    return index === 0 ? lines : [...lines, ufrag, pwd, ...candidates, "a=end-of-candidates"];
  });
  await peer.setRemoteDescription({ type: "answer", sdp: sections.map((l) => l.join("\r\n")).join("\r\n") + "\r\n" });
  if (peer !== pc) return false;
  state.iceRestarts += 1;
  log("ICE restarted");
  return true;
}
state.restartIce = restartIce;

async function connect() {
  const mine = ++attempt;
  const abandoned = () => mine !== attempt;
  startFresh();
  setStatus("connecting");
  try {
    // Browser audio processing flattens speech the model should hear as it is;
    // echo cancellation stays on by default so the model does not hear itself.
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: $("echo-cancellation").checked,
        noiseSuppression: false,
        autoGainControl: false,
        channelCount: 1,
      },
    });
    if (abandoned()) {
      stream.getTracks().forEach((track) => track.stop());
      return;
    }
    microphone = stream;
    const options = await serverOptions();
    if (abandoned()) return; // disconnect() has stopped the microphone
    showRecordingConsent(options.recording);
    const record = options.recording && $("record").checked;
    pc = new RTCPeerConnection({ iceServers: options.iceServers });
    pc.addTransceiver(microphone.getAudioTracks()[0], { direction: "sendrecv" });
    channel = pc.createDataChannel("events");
    channel.addEventListener("message", onEvent);
    channel.addEventListener("open", () => log("data channel open"));
    pc.addEventListener("track", (event) => {
      $("remote-audio").srcObject = event.streams[0] || new MediaStream([event.track]);
    });
    const peer = pc;
    pc.addEventListener("connectionstatechange", () => {
      if (peer !== pc) return; // a past session's connection: not this one's to end
      log(`connection ${peer.connectionState}`);
      if (peer.connectionState === "connected") setStatus("connected");
      if (peer.connectionState === "failed") disconnect("failed");
    });
    // A network change (Wi-Fi to cellular, a new address) drops ICE: restart it
    // rather than the call. One try per disconnection.
    pc.addEventListener("iceconnectionstatechange", () => {
      if (peer === pc && peer.iceConnectionState === "disconnected" && !state.restarting) {
        state.restarting = true;
        restartIce().catch((error) => log(String(error), "error")).finally(() => {
          if (peer === pc) state.restarting = false; // else the page has moved on to a new session
        });
      }
    });

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    if (abandoned()) return;
    const response = await fetch(record ? "/v1/sessions?record=1" : "/v1/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/sdp", traceparent: newTraceparent(), ...AUTH },
      body: pc.localDescription.sdp,
    });
    if (response.status !== 201) {
      const body = await response.json().catch(() => ({}));
      const hint = response.status === 401 ? " (open the page with ?token=...)" : "";
      throw new Error(`signalling failed: HTTP ${response.status} ${body.message || ""}${hint}`);
    }
    // Relative to where the offer landed: a router may have redirected it to a node.
    const sessionUrl = new URL(response.headers.get("Location"), response.url).href;
    if (abandoned()) { // answered after a hang-up: a newer attempt may own the page's state
      fetch(sessionUrl, { method: "DELETE", headers: AUTH }).catch(() => {});
      return;
    }
    state.sessionUrl = sessionUrl;
    state.recording = response.headers.get("Microturn-Recording") === "on";
    log(`session ${state.sessionUrl}${state.recording ? " (recorded)" : ""}`);
    if (record && !state.recording) log("the server did not record this session", "error");
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    if (abandoned()) return;
    timers.push(setInterval(updateStats, STATS_PERIOD_MS));
    timers.push(setInterval(() => sendEvent({ type: "ping", t: performance.now() }), PING_PERIOD_MS));
  } catch (error) {
    if (abandoned()) return;
    log(String(error), "error");
    state.errors.push({ type: "client", message: String(error) });
    await disconnect("failed");
  }
}

async function disconnect(finalStatus = "closed") {
  attempt += 1;
  timers.forEach(clearInterval);
  timers = [];
  setInputsEnabled(false);
  taskBoard.sessionEnded();
  const url = state.sessionUrl;
  state.sessionUrl = null;
  // Microphone and connection first: a slow or unreachable server must not keep
  // capturing and sending the user's audio while its DELETE is pending.
  if (pc) pc.close();
  if (microphone) microphone.getTracks().forEach((track) => track.stop());
  pc = channel = microphone = null;
  state.recording = false;
  state.restarting = false; // a restart in flight on the closed connection never finishes
  if (url) await fetch(url, { method: "DELETE", headers: AUTH }).catch(() => {});
  setStatus(finalStatus);
}

$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", () => disconnect());
$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text-input").value.trim();
  if (!text) return;
  sendEvent({ type: "text.input", text });
  lastTyped = text;
  $("text-input").value = "";
});
$("task-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("task-input").value.trim();
  if (!input) return;
  sendEvent({ type: "task.create", tool: $("task-tool").value, input });
  $("task-input").value = "";
});
window.addEventListener("pagehide", () => {
  // keepalive lets the DELETE outlive the page; the server also notices the peer vanish.
  if (state.sessionUrl) fetch(state.sessionUrl, { method: "DELETE", headers: AUTH, keepalive: true });
});
setStatus("idle");
setInputsEnabled(false);
serverOptions().then((options) => showRecordingConsent(options.recording));
