// How the platform uses the generated types. tsc checks this file (`npm run typecheck`,
// and tests/test_typescript.py), so it breaks when the API changes in a way that the
// platform's code would feel. The types come from `npm run generate`; never edit them.
import type {
  EnhanceBody,
  EnhanceTarget,
  Enhancement,
  ErrorBody,
  JobRequest,
  JobResource,
  JobStatus,
  JobType,
  JobTypeResource,
  ReferenceType,
  paths,
} from "./api";
import type { CallbackPayload } from "./callback";

// A request body: job_type, reference_type and the like accept only the API's values.
export const portrait: JobRequest = {
  job_type: "sdxl_image_fast",
  prompt: "a portrait of a fox in a library, soft light",
  num_images: 3,
  seed: 42,
  reference_image_key: "references/user-1/fox.png",
  reference_type: "character",
  reference_strength: 0.6,
  metadata: { source: "storyboard" },
};

// Operation types, read off the document's paths.
type SubmitBody = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"];
type Submitted = paths["/v1/jobs"]["post"]["responses"][202]["content"]["application/json"];
type EnhanceResponse = paths["/v1/enhance"]["post"]["responses"][200]["content"]["application/json"];

export async function submitJob(baseUrl: string, token: string, body: SubmitBody): Promise<Submitted> {
  const response = await fetch(`${baseUrl}/v1/jobs`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    const { error } = (await response.json()) as ErrorBody;
    throw new Error(`${error.code}: ${error.message}`);
  }
  return (await response.json()) as Submitted;
}

// Exhaustive over the status union: a status added to the API fails to compile here
// until the switch handles it.
export function statusLabel(status: JobStatus): string {
  switch (status) {
    case "queued":
      return "Waiting in line";
    case "processing":
      return "Generating";
    case "completed":
      return "Done";
    case "failed":
      return "Failed";
    case "cancelled":
      return "Cancelled";
    default: {
      const unhandled: never = status;
      return unhandled;
    }
  }
}

export function isTerminal(job: Pick<JobResource, "status">): boolean {
  return job.status === "completed" || job.status === "failed" || job.status === "cancelled";
}

export function assetUrls(job: JobResource): string[] {
  return job.assets.flatMap((asset) => (asset.url ? [asset.url] : []));
}

// A lookup keyed by every job type: a job type added or removed breaks it at compile time.
export const jobTypeLabels: Record<JobType, string> = {
  sdxl_image_fast: "Image (SDXL, fast)",
  sdxl_image_high: "Image (SDXL, high)",
  image_fast: "Image (WAN, fast)",
  image_high: "Image (WAN, high)",
  video_fast: "Video (fast)",
  video_high: "Video (high)",
  image7b_fast_enhanced: "Image, enhanced prompt (fast)",
  image7b_high_enhanced: "Image, enhanced prompt (high)",
  video7b_fast_enhanced: "Video, enhanced prompt (fast)",
  video7b_high_enhanced: "Video, enhanced prompt (high)",
};

export const referenceTypes: readonly ReferenceType[] = ["style", "composition", "character"];

export function videoJobTypes(catalog: JobTypeResource[]): JobType[] {
  return catalog.filter((entry) => entry.format === "video").map((entry) => entry.job_type);
}

// Enhancement: the target names the model the prompt is written for.
export function enhanceBody(prompt: string, target: EnhanceTarget): EnhanceBody {
  return { prompt, target };
}

export const videoPrompt: EnhanceBody = { prompt: "a fox running through snow", target: "wan_video" };

export function enhancedPrompt(result: EnhanceResponse): string {
  const enhancement: Enhancement = result;
  return enhancement.fallback ? enhancement.original_prompt : enhancement.enhanced_prompt;
}

// The callback a job's end POSTs to the platform (e.g. a Supabase edge function).
export function onCallback(payload: CallbackPayload): { jobId: string; done: boolean; assets: string[] } {
  const status: JobStatus = payload.status;
  return { jobId: payload.job_id, done: status === "completed", assets: payload.assets };
}
