/**
 * sse.js: Server-Sent Events over fetch(). EventSource cannot send an Authorization header,
 * so the stream is read with a ReadableStream reader and parsed here, following the
 * WHATWG event-stream rules: lines end in LF, CRLF or CR; `field: value` (one leading space
 * dropped); `event`, `data` (joined with LF), `id`; `:` starts a comment (keep-alive); a
 * blank line dispatches the event; an unfinished event at the end of the stream is dropped.
 */

export class SseParser {
  /** onEvent({type, data, id}) for each event; onComment(text) for each comment line. */
  constructor(onEvent, onComment = () => {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = "";
    this.firstLine = true;
    this.lastEventId = "";
    this.resetEvent();
  }

  resetEvent() {
    this.eventType = "";
    this.dataLines = [];
  }

  /** Feed decoded text; complete lines are processed, a partial one waits for more. */
  push(text) {
    const buffer = this.buffer + text;
    let start = 0;
    for (let i = 0; i < buffer.length; i += 1) {
      const char = buffer[i];
      if (char !== "\n" && char !== "\r") {
        continue;
      }
      if (char === "\r" && i + 1 === buffer.length) {
        break; // a CR at the end of a chunk may be the first half of a CRLF
      }
      const line = buffer.slice(start, i);
      if (char === "\r" && buffer[i + 1] === "\n") {
        i += 1;
      }
      start = i + 1;
      this.processLine(line);
    }
    this.buffer = buffer.slice(start);
  }

  /** The stream ended: a held CR still ends its line; a partial event is discarded. */
  end() {
    if (this.buffer.endsWith("\r")) {
      const line = this.buffer.slice(0, -1);
      this.buffer = "";
      this.processLine(line);
    }
    this.buffer = "";
    this.resetEvent();
  }

  processLine(rawLine) {
    let line = rawLine;
    if (this.firstLine) {
      this.firstLine = false;
      if (line.startsWith("\uFEFF")) {
        line = line.slice(1);
      }
    }
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) {
      value = value.slice(1);
    }
    this.processField(field, value);
  }

  processField(field, value) {
    if (field === "event") {
      this.eventType = value;
    } else if (field === "data") {
      this.dataLines.push(value);
    } else if (field === "id" && !value.includes("\0")) {
      this.lastEventId = value;
    }
    // "retry" and unknown fields are ignored: reconnection is the caller's policy.
  }

  dispatch() {
    if (this.dataLines.length === 0) {
      this.resetEvent();
      return;
    }
    const event = { type: this.eventType || "message", data: this.dataLines.join("\n"), id: this.lastEventId };
    this.resetEvent();
    this.onEvent(event);
  }
}

/**
 * Read an event stream body to its end (or until stop() returns true after an event).
 * Rejects with an AbortError when the fetch's signal aborts.
 */
export async function readEventStream(body, onEvent, { onComment, stop = () => false } = {}) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  const parser = new SseParser(onEvent, onComment);
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        parser.push(decoder.decode());
        parser.end();
        return;
      }
      parser.push(decoder.decode(value, { stream: true }));
      if (stop()) {
        await reader.cancel();
        return;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** The JSON in an event's data, or null when it is not JSON. */
export function eventJson(event) {
  try {
    return JSON.parse(event.data);
  } catch {
    return null;
  }
}
