/**
 * queues.js: the Queues region (service keys only). GET /v1/queues every 2 s while the page
 * is visible, the last failures (GET /v1/jobs?status=failed&limit=5, all users), and links to
 * the Ray dashboard and Grafana when /console/config.json names them.
 */

import { api } from "./api.js";
import { byId, el, setText } from "./dom.js";
import { formatDate, formatSeconds, safeHttpUrl, shortId } from "./util.js";

const REFRESH_MS = 2000;
const FAILURES_EVERY = 5; // refresh the failures every 5th tick (10 s)

/** One figure; `label` names it where a narrow screen shows the rows as blocks. */
function cell(label, text) {
  return el("td", { class: "num", dataset: { label } }, text);
}

function count(value) {
  return value === null || value === undefined ? "—" : String(value);
}

function figures(row) {
  return [
    cell("Queued", count(row.queued)),
    cell("Running", count(row.running)),
    cell("Oldest wait", formatSeconds(row.oldest_wait_s)),
    cell("Backlog", formatSeconds(row.backlog_gpu_seconds)),
  ];
}

function queueRows(queue) {
  const main = el(
    "tr",
    { testid: "queue-row", dataset: { queue: queue.queue } },
    el("th", { scope: "row" }, queue.queue),
    cell("Replicas", count(queue.replicas)),
    ...figures(queue),
  );
  const tiers = (queue.tiers || []).map((tier) =>
    el(
      "tr",
      { class: "tier-row", testid: "tier-row", dataset: { queue: queue.queue, tier: tier.tier } },
      el("th", { scope: "row" }, el("span", { class: "tier-queue" }, `${queue.queue} · `), tier.tier),
      el("td", { class: "num blank" }, ""),
      ...figures(tier),
    ),
  );
  return [main, ...tiers];
}

export function createQueues({ onOpen }) {
  const section = byId("queues");
  const body = byId("queues-body");
  const updated = byId("queues-updated");
  const error = byId("queues-error");
  const failures = byId("failures-list");
  const failuresError = byId("failures-error");
  const links = byId("ops-links");

  let active = false;
  let timer = null;
  let tick = 0;
  let polling = false; // a refresh is in flight
  let configLoaded = false;

  async function refreshQueues() {
    try {
      const answer = await api.queues();
      if (!active) {
        return; // signed out meanwhile
      }
      body.replaceChildren(...answer.queues.flatMap(queueRows));
      setText(error, "");
      setText(updated, `Updated ${new Date().toLocaleTimeString()}`);
    } catch (failure) {
      setText(error, failure.message);
    }
  }

  function failureRow(job) {
    const open = el("button", { type: "button", testid: "open-job", "aria-label": `Open job ${job.id}` }, shortId(job.id));
    open.addEventListener("click", () => onOpen(job.id));
    return el(
      "li",
      { testid: "failure-row", dataset: { jobId: job.id } },
      open,
      " ",
      el("span", {}, job.job_type),
      " ",
      el("span", { class: "hint" }, formatDate(job.completed_at || job.created_at)),
      el("p", { class: "error" }, job.error_message || "(no error message)"),
    );
  }

  async function refreshFailures() {
    try {
      const answer = await api.listJobs({ status: "failed", limit: 5 });
      if (!active) {
        return;
      }
      failures.replaceChildren(...answer.jobs.map(failureRow));
      if (answer.jobs.length === 0) {
        failures.append(el("li", { class: "hint" }, "No failed jobs."));
      }
      setText(failuresError, "");
    } catch (failure) {
      setText(failuresError, failure.message);
    }
  }

  function link(id, text, href) {
    const url = safeHttpUrl(href);
    return url ? el("a", { id, href: url, target: "_blank", rel: "noopener noreferrer" }, text) : null;
  }

  async function loadConfig() {
    configLoaded = true;
    let config = {};
    try {
      config = (await api.consoleConfig()) || {};
    } catch {
      config = {}; // no config: no links
    }
    const items = [link("ray-dashboard-link", "Ray dashboard", config.ray_dashboard_url), link("grafana-link", "Grafana", config.grafana_url)].filter(Boolean);
    links.replaceChildren(...items.map((item) => el("li", {}, item)));
    links.hidden = items.length === 0;
  }

  async function poll() {
    timer = null;
    if (!active || polling || document.visibilityState !== "visible") {
      return; // a hidden page is resumed by visibilitychange
    }
    polling = true;
    try {
      const tasks = [refreshQueues()];
      if (tick % FAILURES_EVERY === 0) {
        tasks.push(refreshFailures());
      }
      tick += 1;
      await Promise.all(tasks);
    } finally {
      polling = false;
    }
    if (active && timer === null && document.visibilityState === "visible") {
      timer = setTimeout(poll, REFRESH_MS);
    }
  }

  function onVisibilityChange() {
    if (active && document.visibilityState === "visible" && timer === null) {
      poll();
    }
  }

  function start() {
    section.hidden = false;
    if (active) {
      return;
    }
    active = true;
    tick = 0;
    if (!configLoaded) {
      loadConfig();
    }
    document.addEventListener("visibilitychange", onVisibilityChange);
    poll();
  }

  function stop() {
    active = false;
    section.hidden = true;
    clearTimeout(timer);
    timer = null;
    document.removeEventListener("visibilitychange", onVisibilityChange);
    body.replaceChildren();
    failures.replaceChildren();
    setText(updated, "");
    setText(error, "");
    setText(failuresError, "");
  }

  byId("queues-refresh").addEventListener("click", () => {
    refreshQueues();
    refreshFailures();
  });

  return { start, stop };
}
