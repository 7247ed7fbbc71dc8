/**
 * watch.js: the Watch region. One card per submitted or opened job, fed by its SSE stream
 * (status, progress, asset); when the stream ends the job is read again for its assets.
 */

import { api, ApiError } from "./api.js";
import { renderAssets, upsertImage } from "./assets.js";
import { byId, el, setText } from "./dom.js";
import { eventJson, readEventStream } from "./sse.js";
import { ACTIVE_STATUSES, TERMINAL_STATUSES, formatDate, isAbortError, shortId, sleep } from "./util.js";

const MAX_RECONNECTS = 5;

function reconnectDelay(failures) {
  return Math.min(1000 * 2 ** failures, 15000);
}

export function createWatch({ onOpen, onChange }) {
  const list = byId("watch-list");
  const empty = byId("watch-empty");
  const cards = new Map();

  function buildCard(job) {
    const refs = {
      status: el("span", { class: "status", testid: "job-status" }),
      queueInfo: el("span", { class: "hint", testid: "job-queue-info" }),
      progress: el("progress", { testid: "job-progress", "aria-label": `Progress of job ${shortId(job.id)}` }),
      step: el("span", { class: "step", testid: "job-step" }),
      error: el("p", { class: "error", testid: "job-error", "aria-live": "polite" }),
      assets: el("div", { class: "assets", testid: "job-assets" }),
      cancel: el("button", { type: "button", testid: "cancel", class: "danger" }, "Cancel"),
      open: el("button", { type: "button", testid: "open-job" }, "Details"),
      dismiss: el("button", { type: "button", testid: "dismiss", "aria-label": `Stop watching job ${shortId(job.id)}` }, "Dismiss"),
    };
    const node = el(
      "li",
      { class: "card job-card", testid: "job-card", dataset: { jobId: job.id } },
      el("div", { class: "card-head" }, el("strong", {}, job.job_type), " ", el("code", { title: job.id }, shortId(job.id))),
      el("p", { class: "prompt-excerpt" }, job.prompt),
      el("p", { class: "status-line", "aria-live": "polite" }, "Status: ", refs.status, " ", refs.queueInfo),
      el("div", { class: "progress-line" }, refs.progress, refs.step),
      refs.error,
      refs.assets,
      el("div", { class: "actions" }, refs.cancel, refs.open, refs.dismiss),
    );
    const card = { id: job.id, job, node, refs, status: null, lastEventId: null, controller: null };
    refs.cancel.addEventListener("click", () => cancel(card));
    refs.open.addEventListener("click", () => onOpen(job.id));
    refs.dismiss.addEventListener("click", () => dismiss(card));
    return card;
  }

  function setStatus(card, status) {
    card.status = status;
    card.node.dataset.status = status;
    setText(card.refs.status, status);
    card.refs.cancel.hidden = !ACTIVE_STATUSES.has(status);
    if (status !== "queued") {
      setText(card.refs.queueInfo, "");
    }
    if (status === "completed") {
      const progress = card.refs.progress;
      progress.max = progress.max > 0 ? progress.max : 1;
      progress.value = progress.max;
    } else if (TERMINAL_STATUSES.has(status) && !card.refs.progress.hasAttribute("value")) {
      card.refs.progress.value = 0; // stop the indeterminate animation
    }
  }

  function setProgress(card, step, total) {
    const progress = card.refs.progress;
    if (!Number.isFinite(step) || !Number.isFinite(total) || total <= 0) {
      return;
    }
    progress.max = total;
    progress.value = Math.min(step, total);
    setText(card.refs.step, `${step}/${total}`);
  }

  function showQueueInfo(card, job) {
    if (job.status !== "queued" || job.queue_position === null || job.queue_position === undefined) {
      return;
    }
    const start = job.estimated_start_at ? `, expected start ${formatDate(job.estimated_start_at)}` : "";
    setText(card.refs.queueInfo, `(position ${job.queue_position}${start})`);
  }

  /** Show a full job resource (from GET, DELETE or the submission answer). */
  function apply(card, job) {
    card.job = job;
    setStatus(card, job.status);
    if (job.progress && job.status === "processing") {
      setProgress(card, job.progress.step, job.progress.total);
    }
    showQueueInfo(card, job);
    setText(card.refs.error, job.error_message || "");
    renderAssets(card.refs.assets, job);
  }

  function handleEvent(card, event) {
    if (event.id) {
      card.lastEventId = event.id;
    }
    const data = eventJson(event);
    if (!data) {
      return;
    }
    if (event.type === "status" && typeof data.status === "string") {
      setStatus(card, data.status);
    } else if (event.type === "progress") {
      setProgress(card, Number(data.step), Number(data.total));
    } else if (event.type === "asset" && card.job.format === "image" && typeof data.url === "string") {
      upsertImage(card.refs.assets, card.job, Number(data.index), data.url);
    }
  }

  async function streamOnce(card, signal) {
    const response = await api.jobEvents(card.id, { signal, lastEventId: card.lastEventId });
    await readEventStream(response.body, (event) => handleEvent(card, event), {
      stop: () => TERMINAL_STATUSES.has(card.status),
    });
  }

  function isFinalError(error) {
    return error instanceof ApiError && error.status >= 400 && error.status < 500 && error.status !== 429;
  }

  /** Follow the stream (reconnecting with Last-Event-ID) until a terminal status, then re-read. */
  async function follow(card) {
    if (card.controller) {
      return;
    }
    const controller = new AbortController();
    card.controller = controller;
    let failures = 0;
    try {
      while (!TERMINAL_STATUSES.has(card.status)) {
        try {
          await streamOnce(card, controller.signal);
          failures = 0;
        } catch (error) {
          if (isAbortError(error)) {
            return;
          }
          failures += 1;
          if (isFinalError(error) || failures > MAX_RECONNECTS) {
            setText(card.refs.error, `Event stream stopped: ${error.message}`);
            break;
          }
        }
        if (!TERMINAL_STATUSES.has(card.status)) {
          await sleep(reconnectDelay(failures), controller.signal);
        }
      }
      await refresh(card);
    } catch (error) {
      if (!isAbortError(error)) {
        setText(card.refs.error, error.message);
      }
    } finally {
      if (card.controller === controller) {
        card.controller = null;
      }
    }
  }

  async function refresh(card) {
    const job = await api.getJob(card.id);
    if (cards.get(card.id) !== card) {
      return; // dismissed meanwhile
    }
    apply(card, job);
    onChange(job);
  }

  async function cancel(card) {
    card.refs.cancel.disabled = true;
    try {
      const job = await api.cancelJob(card.id);
      apply(card, job);
      onChange(job);
    } catch (error) {
      setText(card.refs.error, error.message);
    } finally {
      card.refs.cancel.disabled = false;
    }
  }

  function dismiss(card) {
    card.controller?.abort();
    card.node.remove();
    cards.delete(card.id);
    empty.hidden = cards.size > 0;
  }

  /** Add (or refresh) the card of a job and follow it while it runs. */
  function watch(job) {
    let card = cards.get(job.id);
    if (!card) {
      card = buildCard(job);
      cards.set(job.id, card);
      list.prepend(card.node);
    }
    apply(card, job);
    empty.hidden = true;
    if (!TERMINAL_STATUSES.has(job.status)) {
      follow(card);
    }
  }

  /** A job changed elsewhere (the job page): update its card if there is one. */
  function sync(job) {
    const card = cards.get(job.id);
    if (card) {
      apply(card, job);
      if (!TERMINAL_STATUSES.has(job.status)) {
        follow(card);
      }
    }
  }

  function clear() {
    for (const card of cards.values()) {
      card.controller?.abort();
    }
    cards.clear();
    list.replaceChildren();
    empty.hidden = false;
  }

  return { watch, sync, clear };
}
