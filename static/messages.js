// Every way a console can be refused or end, in words a user can act on.
// One table, so the wording lives in one place: refusal codes are the `error` field of the
// proxy's JSON answers (DESIGN: before the websocket upgrade, and from /token-status); close
// codes are what the proxy sends when it ends an open websocket.

export const REFUSALS = {
    token_missing: "This page was opened without a console link. Open the console from your portal again.",
    token_invalid: "This console link is not valid. Open the console from your portal again.",
    token_expired: "This console link has expired. Open the console from your portal again to get a new one.",
    token_not_yet_valid: "This console link is not valid yet. Check your computer's clock, or ask for a new link.",
    token_used: "This console link has already been used; each link opens once. Ask for a new one.",
    session_revoked: "This console session was ended by an administrator.",
    origin_denied: "This console was opened from a page that is not allowed to use it.",
    client_ip_mismatch: "This console link was issued for another network address.",
    over_capacity: "The console service is busy right now. Try again in a moment.",
    draining: "The console service is restarting. Open the console again.",
    broker_unavailable: "Single-use console links cannot be checked right now. Try again shortly.",
    websocket_required: "The console service expected a websocket connection. Open the console from your portal again.",
    websocket_version: "This browser speaks a websocket version the console service does not. Use a current browser.",
};

export const CLOSES = {
    1000: "The virtual machine closed the console connection.",
    1001: "The console service is shutting down. Open the console again to reconnect.",
    1002: "The console connection received malformed data and was closed.",
    1003: "The console connection received data it cannot use and was closed.",
    1007: "The console connection received text that was not valid and was closed.",
    1009: "The console connection received a message that was too large and was closed.",
    4408: "The console was closed because it was idle for too long.",
    4410: "This console session was ended by an administrator.",
    4500: "The virtual machine's console cannot be reached right now. The VM may be off or moving; try again later.",
    4501: "The virtual machine refused the console service's credentials.",
    4502: "The virtual machine's console answered in a way the console service does not understand.",
};

// 4410 also means "the console's time ran out" (a hard end at the link's expiry): the page
// tells the two apart by the clock, since the close reason is the same public code.
export const SESSION_TIME_UP = "This console session reached the end of its allowed time. Open the console again.";

// A websocket refused before the upgrade reaches the page only as 1006, with no status or body;
// the page then asks /token-status. When that says the link is fine, these are the best guesses.
export const LOST = "The connection to the console service was lost.";
export const NOT_OPENED = "The console could not be opened. Try again, or ask for a new link.";
export const SINGLE_USE_NOT_OPENED =
    "This single-use console link could not be opened: it has already been used, or it cannot be " +
    "checked right now. Ask for a new link.";
export const UNREACHABLE = "The console service cannot be reached. Check your network connection and try again.";
export const USER_DISCONNECTED = "You disconnected the console.";

// After a drop (the network, a proxy restarting): a reusable link reconnects by itself, a
// single-use link is spent.
export const SINGLE_USE_SPENT =
    "The connection to the console was lost. This single-use console link has been used and cannot " +
    "reconnect: open the console from your portal again to get a new link.";
export const RECONNECT_GAVE_UP =
    "The connection to the console was lost and reconnecting did not succeed. Check your network " +
    "connection and open the console again.";

/** The status while reconnecting after a drop. */
export function reconnecting(attempt) {
    return `Connection lost — reconnecting (attempt ${attempt})…`;
}

/** The message for a refusal code, or the proxy's own message for a code this page does not know. */
export function refusalMessage(code, serverMessage) {
    return REFUSALS[code] || serverMessage || `The console was refused (${code}).`;
}

/** The message for a websocket close code other than 1006 (which needs /token-status). */
export function closeMessage(code) {
    return CLOSES[code] || `The console connection ended unexpectedly (code ${code}).`;
}
