// The console viewer: take the token from the URL fragment, ask the proxy whether it is good,
// open noVNC over /websockify, and explain in words every way the console can end.
//
// Loaded as an ES module from the proxy itself (CSP: script-src 'self'); noVNC is served by the
// same proxy under novnc/, unpatched. Every URL here is relative to the page (imports to this
// module), so the viewer works under a path prefix behind a reverse proxy (location /prefix/).

import RFB from "../novnc/core/rfb.js";
import KeyTable from "../novnc/core/input/keysym.js";
import keysyms from "../novnc/core/input/keysymdef.js";
import * as messages from "./messages.js";
import { sendCombination, wireKeysMenu } from "./keysmenu.js";
import { wireClipboard } from "./clipboard.js";

const $ = (id) => document.getElementById(id);
const screen = $("screen");
const statusLine = $("status");
// Remote resize (SetDesktopSize) changes the VM's screen: input, which a view-only console lacks.
const inputButtons = [$("ctrl-alt-del"), $("keys"), $("send-text"), $("resize")];
const viewButtons = [$("scale"), $("fullscreen"), $("disconnect")];

let rfb = null;
let verdict = null;          // the /token-status answer for this token (view_only, expires_at, …)
let userDisconnected = false;
let keysMenu = null;         // the keys menu's controls, once wired
let clipboard = null;        // the clipboard panel's controls, once wired
let attempt = 0;             // reconnect attempts since the console was last connected

// Reconnect after a drop: 1, 2, 4, 8, 8… seconds apart, at most this many times in a row, and
// only while the token is valid. A ceiling, so a page left open cannot knock forever.
const RECONNECT_ATTEMPTS = 8;
const RECONNECT_MAX_DELAY_MS = 8000;

/** The token from `#token=…`, removed from the address bar (and history) before anything else. */
function takeToken() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const token = fragment.get("token");
    if (location.hash) {
        // The fragment never reaches a server, but it would stay in history, bookmarks and
        // screenshots of the address bar; the token is a credential until it expires.
        history.replaceState(null, "", location.pathname + location.search);
    }
    return token || null;
}

/** One place that changes what the user sees: `data-state` drives the CSS, the text says why. */
function show(state, text) {
    document.body.dataset.state = state;
    statusLine.textContent = text;
    const live = state === "connected";
    for (const button of viewButtons) button.disabled = !live;
    for (const button of inputButtons) button.disabled = !live || Boolean(verdict && verdict.view_only);
    // Input controls are hidden, not only greyed out, for a view-only console.
    for (const button of inputButtons) button.hidden = Boolean(verdict && verdict.view_only);
    if ($("keys").disabled && keysMenu) keysMenu.close(false);
    if (clipboard) clipboard.update(live);
}

/** The proxy's verdict on the token, without redeeming it: {ok: true, …} or {ok: false, message}. */
async function checkToken(token) {
    let response;
    try {
        response = await fetch(new URL("token-status", document.baseURI), {
            headers: { Authorization: `Bearer ${token}` },
            cache: "no-store",
            credentials: "omit",
        });
    } catch {
        return { ok: false, message: messages.UNREACHABLE, transient: true };
    }
    const body = await response.json().catch(() => null);
    if (response.ok && body && body.ok) return body;
    if (body && body.error) return { ok: false, message: messages.refusalMessage(body.error, body.message) };
    return { ok: false, message: `The console service answered with an error (HTTP ${response.status}).`,
             transient: response.status >= 500 };
}

function websocketUrl() {
    const url = new URL("websockify", location.href); // beside the page: /prefix/console → /prefix/websockify
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
}

function connect(token) {
    // We open the websocket ourselves and hand it to noVNC (instead of noVNC's `wsProtocols`
    // option) because noVNC's disconnect event does not carry the close code and reason, and
    // the code is what tells "idle timeout" from "ended by an administrator".
    let socket;
    try {
        socket = new WebSocket(websocketUrl(), ["binary", `token.${token}`]);
    } catch {
        show("ended", messages.NOT_OPENED);  // a token with characters a subprotocol cannot carry
        return;
    }
    const seen = { opened: false, close: null };
    socket.addEventListener("open", () => { seen.opened = true; });
    // Registered before noVNC sets `onclose`, so it runs first and the code is known when
    // noVNC's disconnect event fires.
    socket.addEventListener("close", (event) => { seen.close = event; });

    const name = verdict.desktop_name;
    show("connecting", name ? `Connecting to ${name}…` : "Connecting…");
    rfb = new RFB(screen, socket, { shared: true });
    rfb.viewOnly = Boolean(verdict.view_only);   // the proxy drops input anyway; this hides it
    // A reconnect keeps the user's choices: the buttons hold them.
    rfb.scaleViewport = $("scale").getAttribute("aria-pressed") === "true";
    rfb.resizeSession = $("resize").getAttribute("aria-pressed") === "true";
    rfb.background = "#1b1d21";
    $("view-only").hidden = !verdict.view_only;
    labelScreen(verdict.view_only);

    rfb.addEventListener("desktopname", (event) => { document.title = event.detail.name; });
    rfb.addEventListener("clipboard", (event) => { clipboard.received(event.detail.text); });
    rfb.addEventListener("connect", () => {
        attempt = 0;
        show("connected", `Connected to ${document.title}${verdict.view_only ? " (view only)" : ""}`);
        if (!document.getElementById("clipboard-panel").contains(document.activeElement)) rfb.focus();
    });
    rfb.addEventListener("securityfailure", (event) => {
        // The proxy offers only security type None, so this means something between is wrong.
        console.warn("security failure", event.detail.status, event.detail.reason);
    });
    rfb.addEventListener("disconnect", () => {
        rfb = null;
        endOrReconnect(token, seen);
    });
}

/** noVNC's canvas as a keyboard and screen reader user meets it: in the Tab order after the
 * toolbar (noVNC makes it -1), named, and an "application" (a screen reader passes keys through
 * to it instead of using them to read the page). */
function labelScreen(viewOnly) {
    const canvas = screen.querySelector("canvas");
    if (!canvas) return;
    canvas.tabIndex = 0;
    canvas.setAttribute("role", "application");
    canvas.setAttribute("aria-roledescription", "remote screen");
    canvas.setAttribute("aria-label", viewOnly ? "Virtual machine screen (view only)" : "Virtual machine screen");
    canvas.setAttribute("aria-describedby", viewOnly ? "screen-help-view-only" : "screen-help");
}

/** The way out of the console by keyboard: noVNC sends every key, Tab included, to the VM, so
 * Ctrl+Alt+Shift pressed together (Guacamole's menu keys) moves the focus to the toolbar. The
 * third key never reaches the VM; the two pressed before it are released there (noVNC releases
 * every key it holds down on a window blur) so nothing stays held in the VM. */
function wireToolbarKey() {
    const modifiers = new Set(["Control", "Alt", "Shift"]);
    screen.addEventListener("keydown", (event) => {
        if (!(event.ctrlKey && event.altKey && event.shiftKey && modifiers.has(event.key))) return;
        event.preventDefault();
        event.stopPropagation();  // capture phase, on noVNC's canvas's parent: noVNC never sees it
        window.dispatchEvent(new Event("blur"));
        const first = [...document.querySelectorAll("#toolbar nav button")].find((b) => !b.hidden && !b.disabled);
        if (first) first.focus();
    }, true);
}

/** A drop is an abnormal close of a console that was open (or of a reconnect attempt): not a
 * refusal, not an end the proxy chose and named with a code, not the user's own disconnect. */
function wasDropped(seen) {
    const code = seen.close ? seen.close.code : 1006;
    return !userDisconnected && (code === 1006 || code === 1005) && (seen.opened || attempt > 0);
}

async function endOrReconnect(token, seen) {
    if (wasDropped(seen)) {
        // A single-use link was redeemed when it opened: it cannot open the console again.
        if (verdict.single_use) return show("ended", messages.SINGLE_USE_SPENT);
        if (await reconnect(token)) return;
        return show("ended", messages.RECONNECT_GAVE_UP);
    }
    show("ended", await explain(token, seen));
}

/** Wait, then open the console again with the same token; false when it is time to give up. */
async function reconnect(token) {
    while (attempt < RECONNECT_ATTEMPTS) {
        attempt += 1;
        if (verdict.expires_at && Date.now() / 1000 >= verdict.expires_at) {
            show("ended", messages.refusalMessage("token_expired"));  // no point knocking
            return true;
        }
        show("reconnecting", messages.reconnecting(attempt));
        const delay = Math.min(1000 * 2 ** (attempt - 1), RECONNECT_MAX_DELAY_MS);
        await new Promise((resolve) => setTimeout(resolve, delay));
        const again = await checkToken(token);
        if (again.ok) {
            connect(token);  // its disconnect comes back here while `attempt` counts
            return true;
        }
        if (!again.transient) {
            show("ended", again.message);  // expired or revoked meanwhile: the reason, in words
            return true;
        }
    }
    return false;
}

/** Why the console ended, in words. */
async function explain(token, seen) {
    if (userDisconnected) return messages.USER_DISCONNECTED;
    const code = seen.close ? seen.close.code : 1006;
    if (code === 4410 && verdict.expires_at && Date.now() / 1000 >= verdict.expires_at) {
        return messages.SESSION_TIME_UP;
    }
    if (code !== 1006 && code !== 1005) return messages.closeMessage(code);
    // 1006: the browser hides a refusal before the upgrade (its status and JSON body) behind an
    // abnormal close, and a dropped connection looks the same. Ask the proxy again.
    show("checking", "The connection closed; finding out why…");
    const again = await checkToken(token);
    if (!again.ok) return again.message;
    if (!seen.opened) return verdict.single_use ? messages.SINGLE_USE_NOT_OPENED : messages.NOT_OPENED;
    return messages.LOST;
}

/** Type text into the VM as key presses: consoles (BIOS, login prompts) rarely share a clipboard. */
function typeText(text) {
    for (const char of text.replace(/\r\n?/g, "\n")) {
        if (char === "\n") rfb.sendKey(KeyTable.XK_Return, "Enter");
        else if (char === "\t") rfb.sendKey(KeyTable.XK_Tab, "Tab");
        else rfb.sendKey(keysyms.lookup(char.codePointAt(0)), null);
    }
}

function wireToolbar() {
    const dialog = $("text-dialog");
    const textInput = $("text-input");
    const backToConsole = () => { if (rfb) rfb.focus(); };

    $("ctrl-alt-del").addEventListener("click", () => { rfb.sendCtrlAltDel(); backToConsole(); });
    keysMenu = wireKeysMenu($("keys"), $("keys-menu"), (names) => {
        if (rfb) sendCombination(rfb, names);
        backToConsole();
    });
    clipboard = wireClipboard(() => rfb, backToConsole);

    $("send-text").addEventListener("click", async () => {
        textInput.value = "";
        dialog.showModal();
        // Reading the clipboard needs a secure context and the user's permission; without them
        // the user pastes into the box instead.
        if (navigator.clipboard && navigator.clipboard.readText) {
            textInput.value = await navigator.clipboard.readText().catch(() => "");
        }
        textInput.select();
    });
    $("text-form").addEventListener("submit", (event) => {
        event.preventDefault();  // no form submission: CSP has form-action 'none'
        dialog.close();
        if (rfb && textInput.value) typeText(textInput.value);
        backToConsole();
    });
    $("text-cancel").addEventListener("click", () => { dialog.close(); backToConsole(); });

    const scale = $("scale");
    scale.addEventListener("click", () => {
        rfb.scaleViewport = !rfb.scaleViewport;
        // A toggle keeps its name; its state is aria-pressed (a name that flips to "1:1" would
        // be read as "1:1, not pressed").
        scale.setAttribute("aria-pressed", String(rfb.scaleViewport));
        backToConsole();
    });

    // noVNC asks the server for the screen's size now and whenever the window changes, and
    // does nothing when the server does not offer SetDesktopSize (ExtendedDesktopSize).
    const resize = $("resize");
    resize.addEventListener("click", () => {
        rfb.resizeSession = !rfb.resizeSession;
        resize.setAttribute("aria-pressed", String(rfb.resizeSession));
        backToConsole();
    });

    const fullscreen = $("fullscreen");
    fullscreen.addEventListener("click", () => {
        if (document.fullscreenElement) document.exitFullscreen();
        else document.documentElement.requestFullscreen().catch(() => {});
        backToConsole();
    });
    document.addEventListener("fullscreenchange", () => {
        fullscreen.textContent = document.fullscreenElement ? "Exit full screen" : "Full screen";
    });

    $("disconnect").addEventListener("click", () => {
        userDisconnected = true;
        if (rfb) rfb.disconnect();
    });
}

async function main() {
    wireToolbar();
    wireToolbarKey();
    // A new console link pasted into this tab changes only the fragment, which does not load
    // the page again: start over with it (the reload keeps the fragment, takeToken removes it).
    window.addEventListener("hashchange", () => {
        if (new URLSearchParams(location.hash.slice(1)).has("token")) location.reload();
    });
    const token = takeToken();
    if (!token) {
        show("ended", messages.refusalMessage("token_missing"));
        return;
    }
    show("checking", "Checking the console link…");
    const answer = await checkToken(token);
    if (!answer.ok) {
        show("ended", answer.message);
        return;
    }
    verdict = answer;
    clipboard.configure(verdict);
    connect(token);
}

main();
