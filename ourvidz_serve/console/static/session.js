/**
 * session.js: the credential and the acting user, kept in sessionStorage only (this tab, this
 * session; never localStorage, never a URL). A credential with two dots is a user JWT; its
 * payload is decoded for display only (the server verifies it).
 */

const CREDENTIAL_KEY = "ourvidz-console.credential";
const ACTING_USER_KEY = "ourvidz-console.acting-user";

export function isJwt(credential) {
  return (credential.match(/\./g) || []).length === 2;
}

/** The JWT's claims (unverified), or throws when the payload is not base64url JSON. */
export function decodeJwtClaims(token) {
  const payload = token.split(".")[1];
  const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
  const padded = base64.padEnd(Math.ceil(base64.length / 4) * 4, "=");
  const bytes = Uint8Array.from(atob(padded), (char) => char.charCodeAt(0));
  const claims = JSON.parse(new TextDecoder().decode(bytes));
  if (!claims || typeof claims !== "object" || Array.isArray(claims)) {
    throw new Error("the token payload is not a JSON object");
  }
  return claims;
}

/** {kind: "service"|"user", userId, expiresAt, tier} */
export function describeCredential(credential) {
  if (!isJwt(credential)) {
    return { kind: "service", userId: null, expiresAt: null, tier: null };
  }
  let claims = {};
  try {
    claims = decodeJwtClaims(credential);
  } catch {
    claims = {};
  }
  return {
    kind: "user",
    userId: typeof claims.sub === "string" ? claims.sub : null,
    expiresAt: typeof claims.exp === "number" ? new Date(claims.exp * 1000) : null,
    tier: typeof claims.tier === "string" ? claims.tier : null,
  };
}

function storage() {
  try {
    return window.sessionStorage;
  } catch {
    return null; // storage disabled: the session lasts as long as the page
  }
}

export function loadCredential() {
  return storage()?.getItem(CREDENTIAL_KEY) || null;
}

export function saveCredential(credential) {
  storage()?.setItem(CREDENTIAL_KEY, credential);
}

export function loadActingUser() {
  return storage()?.getItem(ACTING_USER_KEY) || null;
}

export function saveActingUser(userId) {
  storage()?.setItem(ACTING_USER_KEY, userId);
}

export function clearSession() {
  storage()?.removeItem(CREDENTIAL_KEY);
  storage()?.removeItem(ACTING_USER_KEY);
}
