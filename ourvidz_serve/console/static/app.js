/**
 * app.js: the operator console's entry point. Sign-in and the session (service key or user
 * JWT), then the wiring between Submit, Watch, Browse, the job page and Queues.
 * Served with a strict CSP: no inline scripts, styles or handlers anywhere in the console.
 */

import { api, setCredential, setUnauthorizedHandler } from "./api.js";
import { createBrowse } from "./browse.js";
import { byId, setText } from "./dom.js";
import { createJobPage } from "./jobpage.js";
import { createQueues } from "./queues.js";
import {
  clearSession,
  describeCredential,
  loadActingUser,
  loadCredential,
  saveActingUser,
  saveCredential,
} from "./session.js";
import { createSubmitForm } from "./submit.js";
import { FieldError, isUuid, randomUuid } from "./util.js";
import { createWatch } from "./watch.js";

let session = null; // {kind: "service"|"user", userId, expiresAt, tier} while signed in

const isService = () => session?.kind === "service";

// ---- the acting user (service keys act for a user they name) ----------------------------

function actingUserValue() {
  return byId("acting-user").value.trim();
}

/** The user_id to send with a submission or upload: the acting user for a service key. */
function submissionUserId() {
  if (!isService()) {
    return null;
  }
  const value = actingUserValue();
  if (!isUuid(value)) {
    throw new FieldError("user_id", "The acting user must be a UUID.");
  }
  return value;
}

/** The user_id filter of the jobs list: the acting user, unless "all users" is ticked. */
function listUserFilter() {
  if (!isService() || byId("filter-all-users").checked) {
    return null;
  }
  return actingUserValue();
}

function setActingUser(value, note = "") {
  byId("acting-user").value = value;
  saveActingUser(value);
  setText(byId("acting-user-error"), "");
  byId("acting-user").removeAttribute("aria-invalid");
  setText(byId("acting-user-note"), note);
}

function onActingUserChange() {
  const value = actingUserValue();
  if (!isUuid(value)) {
    setText(byId("acting-user-error"), "The acting user must be a UUID.");
    byId("acting-user").setAttribute("aria-invalid", "true");
    return;
  }
  // A change event comes again on blur after a scripted one: reload only for a new user,
  // or a page turned meanwhile would jump back to the first.
  const changed = value !== loadActingUser();
  setActingUser(value);
  if (changed) {
    browse.reload();
  }
}

// ---- the regions --------------------------------------------------------------------------

async function openJob(jobId) {
  const job = await jobPage.open(jobId);
  if (job) {
    watch.watch(job);
  }
}

async function runAgain(settings) {
  if (isService() && settings.user_id && settings.user_id !== actingUserValue()) {
    setActingUser(settings.user_id, "Acting user set to the job's user for Run again.");
    browse.reload();
  }
  submit.fill(settings);
  byId("submit-section").scrollIntoView({ block: "start" });
  await submit.submit();
}

const watch = createWatch({
  onOpen: openJob,
  onChange: (job) => {
    jobPage.refreshIf(job.id);
    browse.refresh();
  },
});

const jobPage = createJobPage({
  onCancelled: (job) => {
    watch.sync(job);
    browse.refresh();
  },
  onRunAgain: runAgain,
});

const browse = createBrowse({ userFilter: listUserFilter, onOpen: openJob });

const queues = createQueues({ onOpen: openJob });

const submit = createSubmitForm({
  getUserId: submissionUserId,
  onSubmitted: (job) => {
    watch.watch(job);
    browse.refresh();
  },
});

// ---- sign in / sign out -------------------------------------------------------------------

function describeSession(info) {
  if (info.kind === "service") {
    return "Signed in with a service API key.";
  }
  const who = info.userId ? "Signed in with a user token" : "Signed in with a user token whose user id could not be read";
  const tier = info.tier ? `, tier ${info.tier}` : "";
  const expiry = info.expiresAt ? `; it expires ${info.expiresAt.toLocaleString()}` : "";
  return `${who}${tier}${expiry}.`;
}

function showConsole(visible) {
  byId("signin-section").hidden = visible;
  byId("console").hidden = !visible;
  byId("session").hidden = !visible;
}

function enterConsole(info, jobTypes) {
  session = info;
  byId("credential").value = "";
  showConsole(true);
  setText(byId("session-summary"), describeSession(info));
  setText(byId("session-user-id"), info.userId || "");
  byId("session-user").hidden = !info.userId;
  byId("acting-user-field").hidden = !isService();
  byId("filter-all-users-field").hidden = !isService();
  if (isService()) {
    setActingUser(loadActingUser() || randomUuid());
  }
  submit.setJobTypes(jobTypes);
  browse.setJobTypes(jobTypes);
  browse.reload();
  if (isService()) {
    queues.start();
  } else {
    queues.stop();
  }
  setUnauthorizedHandler((error) => signOut(`Signed out: ${error.message}`));
  byId("job-type").focus();
}

/** Validate a credential with GET /v1/job-types; keep it only when the API accepts it. */
async function signIn(credential) {
  const button = byId("signin-submit");
  setUnauthorizedHandler(null);
  setCredential(credential);
  setText(byId("signin-error"), "");
  setText(byId("signin-status"), "Checking the credential…");
  button.disabled = true;
  let jobTypes;
  try {
    jobTypes = await api.jobTypes();
  } catch (error) {
    setCredential(null);
    clearSession();
    setText(byId("signin-error"), error.message);
    return;
  } finally {
    button.disabled = false;
    setText(byId("signin-status"), "");
  }
  saveCredential(credential);
  enterConsole(describeCredential(credential), jobTypes);
}

function signOut(message = "") {
  setUnauthorizedHandler(null);
  setCredential(null);
  clearSession();
  session = null;
  watch.clear();
  queues.stop();
  browse.clear();
  jobPage.hide();
  submit.reset();
  byId("acting-user").value = "";
  setText(byId("acting-user-note"), "");
  setText(byId("session-summary"), "");
  setText(byId("session-user-id"), "");
  showConsole(false);
  setText(byId("signin-error"), message);
  byId("credential").focus();
}

// ---- start --------------------------------------------------------------------------------

function onOpenJobSubmit(event) {
  event.preventDefault();
  const value = byId("open-job-id").value.trim();
  if (!isUuid(value)) {
    setText(byId("open-job-error"), "A job id is a UUID.");
    return;
  }
  setText(byId("open-job-error"), "");
  openJob(value);
}

function init() {
  byId("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    const credential = byId("credential").value.trim();
    if (!credential) {
      setText(byId("signin-error"), "Enter an API key or a user token.");
      return;
    }
    signIn(credential);
  });
  byId("signout").addEventListener("click", () => signOut());
  byId("acting-user").addEventListener("change", onActingUserChange);
  byId("acting-user-new").addEventListener("click", () => {
    setActingUser(randomUuid());
    browse.reload();
  });
  byId("filter-all-users").addEventListener("change", () => browse.reload());
  byId("open-job-form").addEventListener("submit", onOpenJobSubmit);

  const stored = loadCredential();
  if (stored) {
    signIn(stored);
  }
}

init();
