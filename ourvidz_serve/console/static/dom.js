/**
 * dom.js: building and updating elements. Text only ever goes in through textContent or
 * text nodes (Node.append with strings); no innerHTML, no inline styles, no inline handlers.
 */

/**
 * el("p", {class: "hint", text: "hello", testid: "x", dataset: {jobId: id}, on: {click: fn}}, ...children)
 * Other props become attributes (true: present, false/null/undefined: absent).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    setProp(node, key, value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

function setProp(node, key, value) {
  if (value === undefined || value === null || value === false) {
    return;
  }
  if (key === "text") {
    node.textContent = String(value);
  } else if (key === "class") {
    node.className = value;
  } else if (key === "testid") {
    node.dataset.testid = value;
  } else if (key === "dataset") {
    for (const [name, item] of Object.entries(value)) {
      node.dataset[name] = String(item);
    }
  } else if (key === "on") {
    for (const [event, handler] of Object.entries(value)) {
      node.addEventListener(event, handler);
    }
  } else if (/^on/i.test(key) || key === "style") {
    throw new Error(`refusing inline attribute ${key}`);
  } else {
    node.setAttribute(key, value === true ? "" : String(value));
  }
}

export function byId(id) {
  const node = document.getElementById(id);
  if (!node) {
    throw new Error(`missing element #${id}`);
  }
  return node;
}

export function setText(node, text) {
  node.textContent = text === null || text === undefined ? "" : String(text);
}

export function show(node, visible) {
  node.hidden = !visible;
}

/** A definition list from [term, value] pairs; a value may be a string or a node. */
export function definitionList(pairs, props = {}) {
  const list = el("dl", props);
  for (const [term, value] of pairs) {
    list.append(el("dt", { text: term }), el("dd", {}, value instanceof Node ? value : String(value ?? "—")));
  }
  return list;
}
