/**
 * api.js: the client of ourvidz-serve's public API on this origin. Every request carries
 * `Authorization: Bearer <credential>`; an error answer {"error": {code, message, details}}
 * becomes an ApiError with the same fields (and the HTTP status).
 */

let credential = null;
let unauthorizedHandler = null;

export class ApiError extends Error {
  constructor({ status, code, message, details = null }) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export function setCredential(value) {
  credential = value;
}

/** Called with the ApiError of any 401 on an authenticated request (an expired token). */
export function setUnauthorizedHandler(handler) {
  unauthorizedHandler = handler;
}

function buildUrl(path, query) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") {
      url.searchParams.set(name, String(value));
    }
  }
  return url;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && typeof body === "object" ? body.error : null;
  if (error && typeof error.message === "string") {
    return new ApiError({
      status: response.status,
      code: typeof error.code === "string" ? error.code : `http_${response.status}`,
      message: error.message,
      details: error.details ?? null,
    });
  }
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return new ApiError({ status: response.status, code: `http_${response.status}`, message: `HTTP ${response.status}${reason}` });
}

/** The raw Response of a successful request; throws ApiError otherwise. */
export async function send(path, { method = "GET", query, json, form, headers = {}, signal, auth = true } = {}) {
  const allHeaders = { Accept: "application/json", ...headers };
  if (auth && credential) {
    allHeaders.Authorization = `Bearer ${credential}`;
  }
  let body;
  if (json !== undefined) {
    allHeaders["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(buildUrl(path, query), {
      method,
      headers: allHeaders,
      body,
      signal,
      credentials: "same-origin",
      cache: "no-store",
      redirect: "error",
    });
  } catch (error) {
    if (error?.name === "AbortError") {
      throw error;
    }
    throw new ApiError({ status: 0, code: "network_error", message: `The service could not be reached (${error.message}).` });
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (auth && response.status === 401 && unauthorizedHandler) {
      unauthorizedHandler(error);
    }
    throw error;
  }
  return response;
}

/** The JSON body of a successful request (null for an empty one). */
export async function request(path, options) {
  const response = await send(path, options);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

const jobPath = (jobId) => `/v1/jobs/${encodeURIComponent(jobId)}`;

export const api = {
  jobTypes: () => request("/v1/job-types"),
  submitJob: (body) => request("/v1/jobs", { method: "POST", json: body }),
  getJob: (jobId) => request(jobPath(jobId)),
  listJobs: (query) => request("/v1/jobs", { query }),
  cancelJob: (jobId) => request(jobPath(jobId), { method: "DELETE" }),
  enhance: (prompt, target) => request("/v1/enhance", { method: "POST", json: { prompt, target } }),
  queues: () => request("/v1/queues"),
  consoleConfig: () => request("/console/config.json", { auth: false }),

  uploadReference(file, userId) {
    const form = new FormData();
    form.append("file", file, file.name);
    if (userId) {
      form.append("user_id", userId);
    }
    return request("/v1/references", { method: "POST", form });
  },

  /** The open SSE Response of a job (read its body with sse.js). */
  jobEvents(jobId, { signal, lastEventId } = {}) {
    const headers = { Accept: "text/event-stream" };
    if (lastEventId) {
      headers["Last-Event-ID"] = lastEventId;
    }
    return send(`${jobPath(jobId)}/events`, { headers, signal });
  },
};
