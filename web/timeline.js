// A live two-lane timeline: one column per micro-turn, the user's loudness above,
// the model's below, so overlap, pauses and interruptions are visible at a glance.

const TURNS_SHOWN = 75; // 15 s
const FULL_SCALE_RMS = 0.15;

export class Timeline {
  constructor(canvas) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.turns = []; // {turn, user, model}
  }

  add(event) {
    this.turns.push({ turn: event.turn, user: event.in_rms ?? 0, model: event.out_rms ?? 0 });
    if (this.turns.length > TURNS_SHOWN) this.turns.shift();
    this.draw();
  }

  clear() {
    this.turns = [];
    this.draw();
  }

  draw() {
    const { canvas, context: g } = this;
    const width = canvas.width;
    const height = canvas.height;
    const lane = (height - 24) / 2;
    const column = width / TURNS_SHOWN;
    g.clearRect(0, 0, width, height);
    g.fillStyle = "#f0f1f3";
    g.fillRect(0, 0, width, lane);
    g.fillRect(0, lane + 4, width, lane);
    g.font = "11px system-ui, sans-serif";
    this.turns.forEach((t, i) => {
      const x = i * column;
      const user = Math.min(1, t.user / FULL_SCALE_RMS);
      const model = Math.min(1, t.model / FULL_SCALE_RMS);
      g.fillStyle = "#1f6feb";
      g.fillRect(x + 1, lane - user * lane, column - 2, user * lane);
      g.fillStyle = "#d9480f";
      g.fillRect(x + 1, lane + 4, column - 2, model * lane);
      if (t.turn % 5 === 0) {
        g.fillStyle = "#8a9099";
        g.fillText(`${(t.turn * 0.2).toFixed(0)}s`, x, height - 4);
      }
    });
    g.fillStyle = "#5b6168"; // labels last, over the bars
    g.fillText("you", 4, 12);
    g.fillText("model", 4, lane + 16);
  }
}
