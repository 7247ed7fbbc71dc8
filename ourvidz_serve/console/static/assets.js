/**
 * assets.js: a job's images or video, as the Watch cards and the job page show them.
 * URLs are the API's signed same-origin /v1/files/... URLs: no header is needed to load them.
 */

import { el } from "./dom.js";
import { formatDate, safeHttpUrl, shortId } from "./util.js";

function assetLabel(job, index) {
  return job.format === "video" ? "Video" : `Image ${index + 1}`;
}

function imageElement(url, alt) {
  return el("img", { testid: "job-image", src: url, alt, loading: "lazy", decoding: "async" });
}

function videoElement(url, posterUrl, label) {
  const video = el("video", {
    testid: "job-video",
    controls: true,
    muted: true,
    playsinline: true,
    preload: "auto",
    poster: posterUrl || null,
    src: url,
    "aria-label": label,
  });
  video.muted = true; // the attribute sets only the default
  return video;
}

function figure(job, index, seed, media, url) {
  const label = assetLabel(job, index);
  const caption = el("figcaption", {}, seed === null || seed === undefined ? label : `${label} · seed ${seed}`);
  const href = safeHttpUrl(url);
  if (href) {
    caption.append(" · ", el("a", { href, target: "_blank", rel: "noopener noreferrer", text: "open file" }));
  }
  return el("figure", { class: "asset", dataset: { index } }, media, caption);
}

function renderAsset(job, asset) {
  const label = assetLabel(job, asset.index);
  if (!asset.url) {
    return el("p", { class: "asset-pending", testid: "asset-pending", dataset: { index: asset.index } }, `${label}: ${asset.status}`);
  }
  const media =
    job.format === "video"
      ? videoElement(asset.url, asset.thumbnail_url, `${label} of job ${shortId(job.id)}`)
      : imageElement(asset.url, `${label} of job ${shortId(job.id)}`);
  return figure(job, asset.index, asset.seed, media, asset.url);
}

/** Replace the container's content with the job's assets (placeholders until they have URLs). */
export function renderAssets(container, job) {
  container.replaceChildren();
  if (job.expired_at) {
    container.append(el("p", { class: "hint" }, `Files deleted by retention on ${formatDate(job.expired_at)}.`));
    return;
  }
  const assets = [...(job.assets || [])].sort((a, b) => a.index - b.index);
  container.append(...assets.map((asset) => renderAsset(job, asset)));
}

/** Show one image as soon as its `asset` event arrives (before the job is re-read). */
export function upsertImage(container, job, index, url) {
  const node = figure(job, index, null, imageElement(url, `${assetLabel(job, index)} of job ${shortId(job.id)}`), url);
  const existing = Array.from(container.children).find((child) => child.dataset.index === String(index));
  if (existing) {
    existing.replaceWith(node);
  } else {
    container.append(node);
  }
}
