// Task cards: one per background task, with a progress bar, the result or the
// reason it failed, and a cancel button while it runs.

export class TaskBoard {
  constructor(list, cancel) {
    this.list = list;
    this.cancel = cancel;
    this.cards = new Map(); // task_id -> elements
  }

  created(event) {
    const card = document.createElement("li");
    card.className = "task running";
    card.dataset.taskId = event.task_id;
    const title = document.createElement("div");
    title.className = "task-title";
    title.textContent = `${event.task_id} · ${event.tool}${event.origin === "model" ? " (asked by the model)" : ""}`;
    const input = document.createElement("div");
    input.className = "task-input";
    input.textContent = event.input;
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.removeAttribute("value"); // indeterminate until the first progress
    const status = document.createElement("div");
    status.className = "task-status";
    status.textContent = "running…";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", () => this.cancel(event.task_id));
    card.append(title, input, bar, status, cancel);
    this.list.prepend(card);
    this.cards.set(event.task_id, { card, bar, status, cancel });
  }

  progress(event) {
    const parts = this.cards.get(event.task_id);
    if (!parts) return;
    if (typeof event.fraction === "number") parts.bar.value = event.fraction;
    parts.status.textContent = event.message;
  }

  /** The session ended: its running tasks went with it, and no card may cancel a task
   *  of the next session (task ids restart with every session). */
  sessionEnded() {
    for (const parts of this.cards.values()) {
      if (!parts.card.classList.contains("running")) continue;
      parts.card.className = "task ended";
      parts.status.textContent = "ended with the session";
      parts.cancel.remove();
    }
  }

  clear() {
    this.list.replaceChildren();
    this.cards.clear();
  }

  finished(event, ok) {
    const parts = this.cards.get(event.task_id);
    if (!parts) return;
    parts.card.className = `task ${ok ? "done" : "failed"}`;
    parts.bar.value = ok ? 1 : parts.bar.value || 0;
    parts.status.textContent = ok ? event.result : `failed: ${event.reason}`;
    parts.cancel.remove();
  }
}
