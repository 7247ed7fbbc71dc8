// How a caller uses the service's OpenAI-compatible routes (/v1/images, /v1/videos, /v1/models)
// through the official `openai` npm package, pinned in package.json. tsc checks this file with
// the rest of src/ under --strict (`npm run typecheck`, and tests/test_typescript.py), so an SDK
// upgrade whose types stop accepting these calls fails the build. It is ordinary code: compile it
// and call `tour(apiKey)` against a running service (the SDK needs Node.js 22 or later to run).
import OpenAI, { toFile } from "openai";
import type { JobRequest, JobType } from "./api";

// The service's routes sit under /v1 exactly as OpenAI's do, so the SDK's paths
// (/images/generations, /videos, ...) land on them. The SDK sends `Authorization: Bearer <apiKey>`.
export const BASE_URL = "http://127.0.0.1:8000/v1";

export function ourvidzClient(apiKey: string, baseURL: string = BASE_URL): OpenAI {
  return new OpenAI({ apiKey, baseURL });
}

// Our model names are job types, from the generated API types (./api), so a misspelt model is
// a compile error here and a job type added to the API is accepted without an edit.
export type VideoJobType = Extract<JobType, `video${string}`>;
export type ImageJobType = Exclude<JobType, VideoJobType>;

// Images. The SDK types `model` and `size` as `(string & {}) | <OpenAI's names>`, so our values
// type-check as they are; only `model` is narrowed, to our image job types. The service's extra
// fields (negative_prompt, seed, metadata) are typed as the job API declares them. The SDK sends
// the params object as the JSON body unchanged (its README: extra values "will be sent as-is"),
// and TypeScript's excess-property check applies only to object literals, so a value of this
// (wider) type passes to `images.generate` with every field checked and no cast.
export interface ImageParams
  extends Omit<OpenAI.ImageGenerateParamsNonStreaming, "model">,
    Pick<JobRequest, "negative_prompt" | "seed" | "metadata"> {
  model: ImageJobType;
}

export async function generateImages(client: OpenAI, params: ImageParams): Promise<string[]> {
  const response = await client.images.generate(params);
  // `data` is optional in the SDK's ImagesResponse; each image carries b64_json or url,
  // depending on response_format.
  return (response.data ?? []).flatMap((image) => {
    const value = image.b64_json ?? image.url;
    return value === undefined ? [] : [value];
  });
}

export async function portraits(client: OpenAI, user: string): Promise<string[]> {
  const params: ImageParams = {
    model: "sdxl_image_fast",
    prompt: "a portrait of a fox in a library, soft light",
    n: 3,
    size: "1024x1024",
    response_format: "b64_json",
    user,
    negative_prompt: "blurry, low contrast",
    seed: 42,
    metadata: { source: "storyboard" },
  };
  const images = await generateImages(client, params);
  if (images.length === 0) throw new Error("the service returned no images");
  return images;
}

// An edit is multipart: the SDK encodes `image` (a File, Blob or bytes via toFile) as a form part.
export async function restyle(client: OpenAI, png: Uint8Array, prompt: string): Promise<string | undefined> {
  const response = await client.images.edit({
    model: "sdxl_image_high" satisfies ImageJobType,
    image: await toFile(png, "reference.png", { type: "image/png" }),
    prompt,
    n: 1,
    response_format: "url",
  });
  return response.data?.[0]?.url;
}

// Videos. `model` is `(string & {}) | VideoModel` in the SDK, but `size` (VideoSize) and
// `seconds` (VideoSeconds) are closed unions of Sora's values with no `string & {}`: our
// "832x480" is not among them, so VideoCreateParams cannot hold it without a cast. VideoParams is
// the SDK's params with our model (a video job type), size (any WxH) and seconds (any numeric
// string, wider than Sora's "4" | "8" | "12"; the service validates the duration). createVideo
// sends it through the SDK-documented escape hatch for values its types do not declare, the
// `body` request option (README, "Making custom/undocumented requests": "you can explicitly send
// an extra argument ... with the query, body, and headers request options"). `videos.create`
// spreads the request options over `{ body }`, so `options.body` is the whole body sent (as
// multipart/form-data: the SDK always encodes POST /videos so) and the first argument, which the
// method requires, is not sent. Every field of VideoParams stays type-checked, with no cast.
export interface VideoParams extends Omit<OpenAI.VideoCreateParams, "model" | "size" | "seconds"> {
  model: VideoJobType;
  size?: `${number}x${number}`;
  seconds?: `${number}`;
  /** The end user (a UUID): required with a service key; a user's token acts for its user. */
  user?: string;
}

export function createVideo(
  client: OpenAI,
  params: VideoParams,
  options?: OpenAI.RequestOptions,
): Promise<OpenAI.Video> {
  return client.videos.create({ prompt: params.prompt, model: params.model }, { ...options, body: params });
}

export type VideoStatus = OpenAI.Video["status"];

export function videoEnded(status: VideoStatus): boolean {
  switch (status) {
    case "queued":
    case "in_progress":
      return false;
    case "completed":
    case "failed":
      return true;
    default: {
      const unhandled: never = status;
      return unhandled;
    }
  }
}

export async function waitForVideo(client: OpenAI, id: string, pollMs = 2000): Promise<OpenAI.Video> {
  for (;;) {
    // The response's `size` is typed VideoSize but holds what the service rendered ("832x480").
    const video = await client.videos.retrieve(id);
    if (videoEnded(video.status)) return video;
    await new Promise((resolve) => setTimeout(resolve, pollMs));
  }
}

export async function download(
  client: OpenAI,
  id: string,
  variant: NonNullable<OpenAI.VideoDownloadContentParams["variant"]>,
): Promise<Uint8Array> {
  // GET /v1/videos/{id}/content?variant=...: a fetch Response of the raw bytes.
  const response = await client.videos.downloadContent(id, { variant });
  return new Uint8Array(await response.arrayBuffer());
}

export async function recentVideoIds(client: OpenAI, after?: string, limit = 20): Promise<string[]> {
  const page = await client.videos.list(after === undefined ? { limit } : { after, limit });
  return page.data.map((video) => video.id);
}

export async function allVideoIds(client: OpenAI): Promise<string[]> {
  const ids: string[] = [];
  // Auto-pagination follows `has_more` and `last_id` (as `after`) of each GET /v1/videos page.
  for await (const video of client.videos.list({ limit: 100 })) ids.push(video.id);
  return ids;
}

export async function deleteVideo(client: OpenAI, id: string): Promise<boolean> {
  const deleted = await client.videos.delete(id);
  return deleted.deleted;
}

export async function modelIds(client: OpenAI): Promise<string[]> {
  const ids: string[] = [];
  for await (const model of client.models.list()) ids.push(model.id);
  return ids;
}

// Every route in turn: models, three images, a video rendered, fetched with its thumbnail,
// listed and deleted. `user` is the end user's id (a UUID), which a service key must name.
export async function tour(apiKey: string, user: string, baseURL: string = BASE_URL) {
  const client = ourvidzClient(apiKey, baseURL);
  const models = await modelIds(client);
  const images = await portraits(client, user);
  const created = await createVideo(client, {
    model: "video_fast",
    prompt: "a fox running through snow",
    seconds: "4",
    size: "832x480",
    user,
  });
  const video = await waitForVideo(client, created.id);
  if (video.status === "failed") {
    throw new Error(`video ${video.id} failed: ${video.error?.code ?? ""} ${video.error?.message ?? ""}`);
  }
  const mp4 = await download(client, video.id, "video");
  const thumbnail = await download(client, video.id, "thumbnail");
  const listed = await recentVideoIds(client, undefined, 10);
  const deleted = await deleteVideo(client, video.id);
  return {
    models,
    images: images.length,
    video: video.id,
    bytes: { mp4: mp4.byteLength, thumbnail: thumbnail.byteLength },
    listed,
    deleted,
  };
}
