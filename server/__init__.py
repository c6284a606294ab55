"""microturn's server: WebRTC signalling, media in/out, the engine loop, telemetry."""
