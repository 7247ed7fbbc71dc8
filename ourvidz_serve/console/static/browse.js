/**
 * browse.js: the Browse region. GET /v1/jobs newest first, 10 a page, filtered by status and
 * job type (and by the acting user with a service key); a stack of cursors for Prev / Next.
 */

import { api } from "./api.js";
import { byId, el, setText } from "./dom.js";
import { JOB_STATUSES, formatDate, shortId } from "./util.js";

const PAGE_SIZE = 10;

export function createBrowse({ userFilter, onOpen }) {
  const list = byId("browse-list");
  const status = byId("browse-status");
  const error = byId("browse-error");
  const filterStatus = byId("filter-status");
  const filterType = byId("filter-type");
  const prev = byId("browse-prev");
  const next = byId("browse-next");
  const page = byId("browse-page");

  let cursors = [null]; // the cursor of each page shown so far; the last is the current page
  let nextCursor = null;
  let generation = 0; // answers of superseded loads are dropped

  function fillStatusFilter() {
    filterStatus.replaceChildren(el("option", { value: "" }, "Any status"), ...JOB_STATUSES.map((name) => el("option", { value: name }, name)));
  }

  function setJobTypes(types) {
    const previous = filterType.value;
    filterType.replaceChildren(el("option", { value: "" }, "Any type"), ...types.map((type) => el("option", { value: type.job_type }, type.job_type)));
    filterType.value = types.some((type) => type.job_type === previous) ? previous : "";
  }

  function row(job) {
    const open = el("button", { type: "button", testid: "open-job", "aria-label": `Open job ${job.id}` }, "Open");
    open.addEventListener("click", () => onOpen(job.id));
    return el(
      "li",
      { class: "job-row", testid: "job-row", dataset: { jobId: job.id, status: job.status } },
      el(
        "div",
        { class: "row-head" },
        el("code", { title: job.id }, shortId(job.id)),
        el("span", {}, job.job_type),
        el("span", { class: "status", testid: "row-status" }, job.status),
        el("span", { class: "hint" }, formatDate(job.created_at)),
        el("span", { class: "hint", title: job.user_id }, `user ${shortId(job.user_id)}`),
      ),
      el("p", { class: "prompt-excerpt" }, job.prompt),
      job.error_message ? el("p", { class: "error" }, job.error_message) : null,
      open,
    );
  }

  function query() {
    return {
      limit: PAGE_SIZE,
      user_id: userFilter(),
      status: filterStatus.value,
      job_type: filterType.value,
      cursor: cursors[cursors.length - 1],
    };
  }

  function updatePager() {
    prev.disabled = cursors.length <= 1;
    next.disabled = !nextCursor;
    setText(page, `Page ${cursors.length}`);
  }

  async function load() {
    const mine = ++generation;
    setText(error, "");
    setText(status, "Loading…");
    let answer;
    try {
      answer = await api.listJobs(query());
    } catch (failure) {
      if (mine === generation) {
        setText(status, "");
        setText(error, failure.message);
      }
      return;
    }
    if (mine !== generation) {
      return;
    }
    nextCursor = answer.next_cursor || null;
    list.replaceChildren(...answer.jobs.map(row));
    setText(status, answer.jobs.length === 0 ? "No jobs match." : `${answer.jobs.length} job(s) on this page.`);
    updatePager();
  }

  /** Back to the first page (a filter or the acting user changed). */
  function reload() {
    cursors = [null];
    nextCursor = null;
    return load();
  }

  function clear() {
    generation += 1;
    cursors = [null];
    nextCursor = null;
    list.replaceChildren();
    setText(status, "");
    setText(error, "");
    updatePager();
  }

  fillStatusFilter();
  updatePager();
  byId("browse-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  filterStatus.addEventListener("change", reload);
  filterType.addEventListener("change", reload);
  next.addEventListener("click", () => {
    if (nextCursor) {
      cursors.push(nextCursor);
      load();
    }
  });
  prev.addEventListener("click", () => {
    if (cursors.length > 1) {
      cursors.pop();
      load();
    }
  });

  return { setJobTypes, reload, refresh: load, clear };
}
