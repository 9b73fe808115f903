// The keys menu: combinations a browser or the user's own system would keep for itself
// (Ctrl-Alt-F1 switches the user's own console, the Windows key opens the user's own start menu,
// a touch screen has no Esc or Tab), sent to the VM as key presses.
//
// A WAI-ARIA menu button: a real <button> with aria-haspopup/aria-expanded opening a
// role=menu list of role=menuitem entries; Enter, Space and the arrow keys open it, the arrows,
// Home and End move in it, Enter and Space pick, Escape and Tab close it.

import KeyTable from "../novnc/core/input/keysym.js";

/** A key: its X keysym and its KeyboardEvent.code (noVNC turns the code into a scancode for
 * servers that take QEMU's extended key events, which then ignore the keysym). */
const KEYS = {
    ctrl: [KeyTable.XK_Control_L, "ControlLeft"],
    alt: [KeyTable.XK_Alt_L, "AltLeft"],
    sysrq: [KeyTable.XK_Sys_Req, "PrintScreen"],
    backspace: [KeyTable.XK_BackSpace, "Backspace"],
    super: [KeyTable.XK_Super_L, "MetaLeft"],
    escape: [KeyTable.XK_Escape, "Escape"],
    tab: [KeyTable.XK_Tab, "Tab"],
};
for (let n = 1; n <= 12; n++) KEYS[`f${n}`] = [KeyTable[`XK_F${n}`], `F${n}`];
for (const letter of "reisub") KEYS[letter] = [KeyTable[`XK_${letter}`], `Key${letter.toUpperCase()}`];

const SYSRQ_MEANINGS = {
    r: "keyboard out of raw mode",
    e: "terminate all processes",
    i: "kill all processes",
    s: "sync disks",
    u: "remount read-only",
    b: "reboot now",
};

/** The entries: [label, key names pressed in order and released in reverse], null a separator. */
export function entries() {
    const list = [];
    for (let n = 1; n <= 12; n++) list.push([`Ctrl-Alt-F${n}`, ["ctrl", "alt", `f${n}`]]);
    list.push(null, ["Ctrl-Alt-Backspace", ["ctrl", "alt", "backspace"]], null);
    for (const letter of "reisub") {
        list.push([`Alt-SysRq-${letter.toUpperCase()} (${SYSRQ_MEANINGS[letter]})`, ["alt", "sysrq", letter]]);
    }
    list.push(null, ["Windows key", ["super"]], ["Esc", ["escape"]], ["Tab", ["tab"]]);
    return list;
}

/** Press the keys in order, release them in reverse: what a person's fingers do. */
export function sendCombination(rfb, names) {
    const keys = names.map((name) => KEYS[name]);
    for (const [keysym, code] of keys) rfb.sendKey(keysym, code, true);
    for (const [keysym, code] of keys.slice().reverse()) rfb.sendKey(keysym, code, false);
}

/** Build the menu under `button` into `menu`; `send(names)` is called with the picked keys. */
export function wireKeysMenu(button, menu, send) {
    for (const entry of entries()) {
        const li = document.createElement("li");
        if (entry === null) {
            li.setAttribute("role", "separator");
        } else {
            li.setAttribute("role", "menuitem");
            li.tabIndex = -1;
            li.textContent = entry[0];
            li.dataset.keys = entry[1].join(" ");
        }
        menu.append(li);
    }
    const items = () => [...menu.querySelectorAll('[role="menuitem"]')];
    const isOpen = () => !menu.hidden;

    function open(focusIndex = 0) {
        menu.hidden = false;
        button.setAttribute("aria-expanded", "true");
        const all = items();
        all[(focusIndex + all.length) % all.length].focus();
    }
    function close(refocus) {
        if (!isOpen()) return;
        menu.hidden = true;
        button.setAttribute("aria-expanded", "false");
        if (refocus) button.focus();
    }
    function pick(item) {
        close(false);
        send(item.dataset.keys.split(" "));
    }

    button.addEventListener("click", () => (isOpen() ? close(true) : open(0)));
    button.addEventListener("keydown", (event) => {
        if (event.key === "ArrowDown") { event.preventDefault(); open(0); }
        else if (event.key === "ArrowUp") { event.preventDefault(); open(-1); }
    });
    menu.addEventListener("click", (event) => {
        const item = event.target.closest('[role="menuitem"]');
        if (item) pick(item);
    });
    menu.addEventListener("keydown", (event) => {
        const all = items();
        const index = all.indexOf(document.activeElement);
        const moves = { ArrowDown: index + 1, ArrowUp: index - 1, Home: 0, End: all.length - 1 };
        if (event.key in moves) {
            all[(moves[event.key] + all.length) % all.length].focus();
        } else if (event.key === "Enter" || event.key === " ") {
            if (index >= 0) pick(all[index]);
        } else if (event.key === "Escape") {
            close(true);
        } else if (event.key === "Tab") {
            close(false);
            return;  // let the focus move on
        } else {
            return;
        }
        event.preventDefault();
        event.stopPropagation();  // the console's key handler must not see menu navigation
    });
    document.addEventListener("pointerdown", (event) => {
        if (isOpen() && !menu.contains(event.target) && event.target !== button) close(false);
    });
    return { close };
}
