/**
 * jobpage.js: one job in full (#job-page): parameters, timings, attempts, callback
 * deliveries, metadata as JSON text, its assets, and Cancel / Run again.
 */

import { api } from "./api.js";
import { renderAssets } from "./assets.js";
import { byId, definitionList, el, setText } from "./dom.js";
import { ACTIVE_STATUSES, formatDate, formatSeconds, secondsBetween } from "./util.js";

/** The submit form's settings that reproduce a job. */
export function settingsFromJob(job) {
  const metadata = job.metadata || {};
  return {
    job_type: job.job_type,
    prompt: job.prompt,
    negative_prompt: metadata.negative_prompt_supported === false ? "" : metadata.negative_prompt || "",
    num_images: metadata.num_images ?? (job.assets?.length || 1),
    seed: metadata.seed ?? null,
    reference_image_key: metadata.reference_image_key || null,
    reference_type: metadata.reference_type || null,
    reference_strength: metadata.reference_strength ?? null,
    user_id: job.user_id,
  };
}

function seedsText(job) {
  const seeds = [...(job.assets || [])]
    .sort((a, b) => a.index - b.index)
    .map((asset) => `#${asset.index}: ${asset.seed ?? "—"}`);
  return seeds.length > 0 ? seeds.join(", ") : "—";
}

function parameters(job) {
  const metadata = job.metadata || {};
  const pairs = [
    ["Job type", job.job_type],
    ["Prompt", job.prompt],
  ];
  if (metadata.enhanced_prompt) {
    pairs.push(["Enhanced prompt", metadata.enhanced_prompt]);
  }
  if (metadata.negative_prompt) {
    pairs.push(["Negative prompt", metadata.negative_prompt]);
  }
  pairs.push(
    ["Images", metadata.num_images ?? job.assets?.length ?? "—"],
    ["Seed", metadata.seed ?? "—"],
    ["Seed per asset", seedsText(job)],
  );
  if (metadata.reference_image_key) {
    pairs.push(["Reference", `${metadata.reference_image_key} (${metadata.reference_type}, strength ${metadata.reference_strength})`]);
  }
  pairs.push(["User", job.user_id], ["Tier", job.tier ?? "—"], ["Created", formatDate(job.created_at)]);
  return definitionList(pairs, { testid: "job-params", class: "params" });
}

function timings(job) {
  const metadata = job.metadata || {};
  return definitionList(
    [
      ["Queue wait", formatSeconds(secondsBetween(job.created_at, job.started_at))],
      ["Generation", formatSeconds(metadata.generation_time)],
      ["Expected", formatSeconds(metadata.expected_generation_time)],
      ["Started", formatDate(job.started_at)],
      ["Finished", formatDate(job.completed_at)],
    ],
    { testid: "timings", class: "params" },
  );
}

function historyItem(attempt) {
  const parts = [formatDate(attempt.at)];
  if (attempt.attempt !== null && attempt.attempt !== undefined) {
    parts.push(`attempt ${attempt.attempt}`);
  }
  if (attempt.status_code !== null && attempt.status_code !== undefined) {
    parts.push(`HTTP ${attempt.status_code}`);
  }
  if (attempt.duration_s !== null && attempt.duration_s !== undefined) {
    parts.push(formatSeconds(attempt.duration_s));
  }
  if (attempt.error) {
    parts.push(attempt.error);
  }
  return el("li", {}, parts.join(" · "));
}

function delivery(callback) {
  const when = callback.delivered_at
    ? `delivered ${formatDate(callback.delivered_at)}`
    : callback.next_attempt_at
      ? `next attempt ${formatDate(callback.next_attempt_at)}`
      : "";
  const summary = [callback.event, callback.status, `${callback.attempts} attempt(s)`, when].filter(Boolean).join(" · ");
  const history = el("ol", { class: "history" }, (callback.history || []).map(historyItem));
  return el("li", { testid: "callback", dataset: { status: callback.status } }, el("span", {}, summary), el("code", { class: "hint" }, ` ${callback.webhook_id}`), history);
}

function callbacks(job) {
  const list = job.callbacks || [];
  const body = list.length > 0 ? el("ul", { class: "callbacks" }, list.map(delivery)) : el("p", { class: "hint" }, "No callback deliveries.");
  return el("div", { testid: "callbacks" }, el("h3", {}, "Callback deliveries"), body);
}

function metadataBlock(job) {
  const pre = el("pre", { testid: "job-metadata", class: "json" });
  pre.textContent = JSON.stringify(job.metadata || {}, null, 2);
  return el("details", {}, el("summary", {}, "Metadata (JSON)"), pre);
}

export function createJobPage({ onCancelled, onRunAgain }) {
  const section = byId("job-page");
  const body = byId("job-page-body");
  const heading = byId("job-page-heading");
  const error = byId("job-page-error");
  let current = null;

  function actions(job) {
    const cancel = el("button", { type: "button", testid: "cancel", class: "danger", hidden: !ACTIVE_STATUSES.has(job.status) }, "Cancel");
    const runAgain = el("button", { type: "button", testid: "run-again" }, "Run again");
    cancel.addEventListener("click", () => cancelJob(job, cancel));
    runAgain.addEventListener("click", () => onRunAgain(settingsFromJob(job)));
    return el("div", { class: "actions" }, cancel, runAgain);
  }

  function render(job) {
    current = job;
    setText(heading, `Job ${job.id}`);
    setText(error, "");
    const assets = el("div", { class: "assets", testid: "job-assets" });
    renderAssets(assets, job);
    const parts = [
      el("p", { class: "status-line", "aria-live": "polite" }, "Status: ", el("strong", { class: "status", testid: "job-status" }, job.status)),
      job.error_message ? el("p", { class: "error", testid: "job-error" }, job.error_message) : null,
      actions(job),
      el("h3", {}, "Parameters"),
      parameters(job),
      el("h3", {}, "Timings"),
      timings(job),
      el("p", { testid: "attempts" }, `Attempts: ${job.attempts}`),
      callbacks(job),
      el("h3", {}, "Assets"),
      assets,
      metadataBlock(job),
    ];
    body.replaceChildren(...parts.filter(Boolean));
    section.dataset.jobId = job.id;
    section.dataset.status = job.status;
  }

  async function cancelJob(job, button) {
    button.disabled = true;
    try {
      await api.cancelJob(job.id);
      const fresh = await api.getJob(job.id);
      render(fresh);
      onCancelled(fresh);
    } catch (failure) {
      setText(error, failure.message);
      button.disabled = false;
    }
  }

  /** Read a job and show it; resolves to the job, or null when it could not be read. */
  async function open(jobId) {
    section.hidden = false;
    setText(error, "");
    try {
      const job = await api.getJob(jobId);
      render(job);
      section.focus();
      return job;
    } catch (failure) {
      setText(error, failure.message);
      return null;
    }
  }

  /** Re-read the shown job when it changed elsewhere (its Watch card saw it end). */
  async function refreshIf(jobId) {
    if (current && current.id === jobId && !section.hidden) {
      try {
        render(await api.getJob(jobId));
      } catch (failure) {
        setText(error, failure.message);
      }
    }
  }

  function hide() {
    current = null;
    section.hidden = true;
    body.replaceChildren();
    setText(error, "");
    delete section.dataset.jobId;
  }

  byId("job-page-close").addEventListener("click", hide);

  return { open, refreshIf, hide };
}
