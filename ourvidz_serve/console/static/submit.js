/**
 * submit.js: the Submit form. Job types from GET /v1/job-types (grouped by model), prompt
 * enhancement (POST /v1/enhance), a reference upload (POST /v1/references) before the job,
 * then POST /v1/jobs. API errors land next to the field they name, else in #submit-error.
 */

import { api } from "./api.js";
import { byId, el, setText } from "./dom.js";
import { FieldError, MAX_SEED } from "./util.js";

/** API field name -> the id of its input (its error element is `#<id>-error`). */
const FIELD_INPUTS = {
  job_type: "job-type",
  jobType: "job-type",
  prompt: "prompt",
  negative_prompt: "negative-prompt",
  num_images: "num-images",
  seed: "seed",
  file: "reference-file",
  reference_image_key: "reference-file",
  reference_image_url: "reference-file",
  reference_type: "reference-type",
  reference_strength: "reference-strength",
  user_id: "acting-user",
  userId: "acting-user",
};

const MODEL_LABELS = { sdxl: "SDXL", wan: "WAN" };

/** The field an API error names: validation `details[0].loc`'s last part, or `details.field`. */
export function errorField(error) {
  const details = error?.details;
  if (Array.isArray(details) && Array.isArray(details[0]?.loc)) {
    const last = details[0].loc[details[0].loc.length - 1];
    return typeof last === "string" ? last : null;
  }
  if (details && typeof details === "object") {
    if (typeof details.field === "string") {
      return details.field;
    }
    if ("reference_image_key" in details) {
      return "reference_image_key";
    }
  }
  return error instanceof FieldError ? error.field : null;
}

function modelLabel(model) {
  return MODEL_LABELS[model] || String(model).toUpperCase();
}

function optionText(type) {
  const per = type.model === "sdxl" ? " per image" : "";
  return `${type.job_type} (~${type.expected_time_s} s${per})`;
}

function typeHint(type) {
  const size = `${type.width}×${type.height}`;
  const frames = type.format === "video" ? `, ${type.num_frames} frames at ${type.fps} fps` : "";
  const enhanced = type.enhanced ? "; prompt enhanced by Qwen 7B first" : "";
  return `${modelLabel(type.model)} ${type.format}, ${size}${frames}, ${type.steps} steps; expected ~${type.expected_time_s} s${type.model === "sdxl" ? " per image" : ""}${enhanced}.`;
}

export function createSubmitForm({ getUserId, onSubmitted }) {
  const form = byId("submit-form");
  const jobType = byId("job-type");
  const prompt = byId("prompt");
  const negativePrompt = byId("negative-prompt");
  const numImages = byId("num-images");
  const seed = byId("seed");
  const referenceFile = byId("reference-file");
  const referenceType = byId("reference-type");
  const referenceStrength = byId("reference-strength");
  const referenceCurrent = byId("reference-current");
  const referenceCurrentText = byId("reference-current-text");
  const referencePreview = byId("reference-preview");
  const submitButton = byId("submit");
  const submitStatus = byId("submit-status");
  const enhanceButton = byId("enhance");
  const enhanceResult = byId("enhance-result");
  const useEnhanced = byId("use-enhanced");

  let types = new Map();
  let carriedReferenceKey = null; // a stored reference reused by "Run again"
  let previewUrl = null;
  let enhancedPrompt = null;

  const selectedType = () => types.get(jobType.value) || null;
  const isSdxl = () => selectedType()?.model === "sdxl";

  // ---- errors -------------------------------------------------------------------------

  function errorElementFor(field) {
    const inputId = FIELD_INPUTS[field];
    return inputId ? document.getElementById(`${inputId}-error`) : null;
  }

  function clearErrors() {
    for (const node of document.querySelectorAll(".field-error[data-form='submit']")) {
      setText(node, "");
    }
    for (const node of form.querySelectorAll("[aria-invalid]")) {
      node.removeAttribute("aria-invalid");
    }
    setText(byId("submit-error"), "");
  }

  /** Put an error next to its field when it names one we show, else in the fallback element. */
  function showError(error, fallbackId = "submit-error") {
    const field = errorField(error);
    const target = (field && errorElementFor(field)) || byId(fallbackId);
    setText(target, error.message);
    const input = field && FIELD_INPUTS[field] ? document.getElementById(FIELD_INPUTS[field]) : null;
    if (input && target.id === `${input.id}-error`) {
      input.setAttribute("aria-invalid", "true");
    }
  }

  // ---- job types ----------------------------------------------------------------------

  function setJobTypes(list) {
    types = new Map(list.map((type) => [type.job_type, type]));
    const groups = new Map();
    for (const type of list) {
      const label = modelLabel(type.model);
      if (!groups.has(label)) {
        groups.set(label, el("optgroup", { label }));
      }
      groups.get(label).append(el("option", { value: type.job_type }, optionText(type)));
    }
    const previous = jobType.value;
    jobType.replaceChildren(...groups.values());
    if (types.has(previous)) {
      jobType.value = previous;
    }
    applyJobType();
  }

  function setNumImagesOptions(allowed) {
    const previous = numImages.value;
    numImages.replaceChildren(...allowed.map((count) => el("option", { value: count }, String(count))));
    if (allowed.map(String).includes(previous)) {
      numImages.value = previous;
    }
    numImages.disabled = allowed.length < 2;
  }

  /** Show the SDXL-only fields for SDXL types, hide (and disable) them for WAN. */
  function applyJobType() {
    const type = selectedType();
    const sdxl = isSdxl();
    for (const node of form.querySelectorAll(".sdxl-only")) {
      node.classList.toggle("is-hidden", !sdxl);
      for (const control of node.querySelectorAll("input, select, textarea, button")) {
        control.disabled = !sdxl;
      }
    }
    setNumImagesOptions(type ? type.allowed_num_images : [1]);
    setText(byId("job-type-hint"), type ? typeHint(type) : "");
  }

  // ---- reference ----------------------------------------------------------------------

  function setCarriedReference(key) {
    carriedReferenceKey = key || null;
    referenceCurrent.hidden = !carriedReferenceKey;
    setText(referenceCurrentText, carriedReferenceKey ? `Using stored reference ${carriedReferenceKey}` : "");
  }

  function showPreview(file) {
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    referencePreview.hidden = !file;
    if (file) {
      previewUrl = URL.createObjectURL(file);
      referencePreview.src = previewUrl;
    } else {
      referencePreview.removeAttribute("src");
    }
  }

  function onReferenceFileChange() {
    const file = referenceFile.files[0] || null;
    if (file) {
      setCarriedReference(null);
    }
    showPreview(file);
  }

  async function referenceKey(userId) {
    const file = referenceFile.files[0];
    if (!isSdxl() || !file) {
      return isSdxl() ? carriedReferenceKey : null;
    }
    setText(submitStatus, "Uploading the reference image…");
    try {
      const stored = await api.uploadReference(file, userId);
      return stored.key;
    } catch (error) {
      // An upload error belongs to the file input unless it names another field we show.
      const field = errorField(error);
      throw new FieldError(field && FIELD_INPUTS[field] ? field : "file", error.message);
    }
  }

  // ---- enhancement --------------------------------------------------------------------

  function enhanceTarget() {
    const type = selectedType();
    if (!type || type.model === "sdxl") {
      return "sdxl";
    }
    return type.format === "video" ? "wan_video" : "wan_image";
  }

  function showEnhancement(result) {
    enhancedPrompt = result.enhanced_prompt;
    setText(byId("enhance-original"), result.original_prompt);
    setText(byId("enhance-enhanced"), result.enhanced_prompt);
    const seconds = Number(result.generation_time);
    const parts = [`target ${result.target}`, `model ${result.model ?? "none"}`];
    if (Number.isFinite(seconds)) {
      parts.push(`${seconds.toFixed(2)} s`);
    }
    if (result.fallback) {
      parts.push("fallback: the original prompt came back");
    }
    if (result.warning) {
      parts.push(result.warning);
    }
    setText(byId("enhance-meta"), parts.join(" · "));
    enhanceResult.hidden = false;
  }

  async function enhance() {
    setText(byId("enhance-error"), "");
    setText(byId("prompt-error"), "");
    const text = prompt.value.trim();
    if (!text) {
      showError(new FieldError("prompt", "Enter a prompt to enhance."));
      prompt.focus();
      return;
    }
    enhanceButton.disabled = true;
    setText(byId("enhance-status"), "Enhancing…");
    try {
      showEnhancement(await api.enhance(text, enhanceTarget()));
      setText(byId("enhance-status"), "Enhanced prompt ready.");
    } catch (error) {
      setText(byId("enhance-status"), "");
      showError(error, "enhance-error");
    } finally {
      enhanceButton.disabled = false;
    }
  }

  function applyEnhanced() {
    if (enhancedPrompt !== null) {
      prompt.value = enhancedPrompt;
      prompt.focus();
    }
  }

  // ---- submission ---------------------------------------------------------------------

  /** Checks the browser can make before asking the API; [field, message] pairs. */
  function localProblems() {
    const problems = [];
    if (!jobType.value) {
      problems.push(["job_type", "Choose a job type."]);
    }
    if (!prompt.value.trim()) {
      problems.push(["prompt", "Enter a prompt."]);
    }
    const seedText = seed.value.trim();
    if (seedText !== "" && !(Number.isInteger(Number(seedText)) && Number(seedText) >= 0 && Number(seedText) <= MAX_SEED)) {
      problems.push(["seed", `The seed is a whole number from 0 to ${MAX_SEED}, or empty for a random one.`]);
    }
    const strength = Number(referenceStrength.value);
    if (isSdxl() && !(strength >= 0.1 && strength <= 1)) {
      problems.push(["reference_strength", "The reference strength is between 0.1 and 1.0."]);
    }
    return problems;
  }

  function buildBody(userId, reference) {
    const body = { job_type: jobType.value, prompt: prompt.value.trim(), num_images: Number(numImages.value) || 1 };
    if (userId) {
      body.user_id = userId;
    }
    if (seed.value.trim() !== "") {
      body.seed = Number(seed.value.trim());
    }
    if (isSdxl()) {
      const negative = negativePrompt.value.trim();
      if (negative) {
        body.negative_prompt = negative;
      }
      if (reference) {
        body.reference_image_key = reference;
        body.reference_type = referenceType.value;
        body.reference_strength = Number(referenceStrength.value);
      }
    }
    return body;
  }

  async function submit() {
    clearErrors();
    const problems = localProblems();
    if (problems.length > 0) {
      problems.forEach(([field, message]) => showError(new FieldError(field, message)));
      return null;
    }
    submitButton.disabled = true;
    setText(submitStatus, "Submitting…");
    try {
      const userId = getUserId();
      const reference = await referenceKey(userId);
      const job = await api.submitJob(buildBody(userId, reference));
      setText(submitStatus, `Submitted job ${job.id} (${job.status}).`);
      onSubmitted(job);
      return job;
    } catch (error) {
      setText(submitStatus, "");
      showError(error);
      return null;
    } finally {
      submitButton.disabled = false;
    }
  }

  /** Fill the form with a job's settings ("Run again"). */
  function fill(settings) {
    clearErrors();
    if (types.has(settings.job_type)) {
      jobType.value = settings.job_type;
    }
    applyJobType();
    prompt.value = settings.prompt || "";
    negativePrompt.value = settings.negative_prompt || "";
    if (settings.num_images) {
      numImages.value = String(settings.num_images);
    }
    seed.value = settings.seed === null || settings.seed === undefined ? "" : String(settings.seed);
    referenceFile.value = "";
    showPreview(null);
    setCarriedReference(settings.reference_image_key);
    if (settings.reference_type) {
      referenceType.value = settings.reference_type;
    }
    if (settings.reference_strength !== null && settings.reference_strength !== undefined) {
      referenceStrength.value = String(settings.reference_strength);
    }
  }

  function reset() {
    form.reset();
    clearErrors();
    setCarriedReference(null);
    showPreview(null);
    enhancedPrompt = null;
    enhanceResult.hidden = true;
    setText(submitStatus, "");
    setText(byId("enhance-status"), "");
    setText(byId("enhance-error"), "");
    jobType.replaceChildren();
    types = new Map();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  jobType.addEventListener("change", applyJobType);
  referenceFile.addEventListener("change", onReferenceFileChange);
  byId("reference-clear").addEventListener("click", () => setCarriedReference(null));
  enhanceButton.addEventListener("click", enhance);
  useEnhanced.addEventListener("click", applyEnhanced);

  return { setJobTypes, fill, submit, reset, showError };
}
