// The clipboard panel: text copied in the VM shows here (and goes to the user's clipboard when
// the browser allows it), and text typed or pasted here is sent to the VM's clipboard.
//
// What the panel offers follows the token's `clip` policy (from /token-status): `out` shows the
// VM's copies, `in` the box to send text, `both` both, `none` neither (the button is hidden).
// The proxy enforces the policy on the wire whatever this page does; hiding only spares the user
// controls that could not work. A view-only console cannot send (the proxy drops all input).

const $ = (id) => document.getElementById(id);

const COPIED = "Copied from the virtual machine to your clipboard.";
const NOT_COPIED = "Your browser did not let this page write to your clipboard: use the Copy button.";
const SENT = "Sent to the virtual machine's clipboard: paste it there with its own paste command.";
const tooLong = (limit) => `The text is too long for the virtual machine's clipboard (at most ${Math.floor(limit / 1024)} KiB).`;

/** The directions a `clip` value allows (absent means both, as for the proxy). */
export function clipDirections(clip) {
    const value = clip || "both";
    return { in: value === "in" || value === "both", out: value === "out" || value === "both" };
}

/** Wire the panel once; returns {configure(verdict), received(text), update(live)}. */
export function wireClipboard(getRfb, backToConsole) {
    const button = $("clipboard");
    const panel = $("clipboard-panel");
    const fromVm = $("clip-from-vm");
    const toVm = $("clip-to-vm");
    const outStatus = $("clip-out-status");
    const inStatus = $("clip-in-status");
    let allowed = { in: false, out: false };
    let limit = Infinity;  // bytes the proxy passes (Latin-1 or UTF-8: UTF-8's length is the upper bound)

    const setOpen = (open) => {
        panel.hidden = !open;
        button.setAttribute("aria-expanded", String(open));
        if (open) (allowed.out ? fromVm : toVm).focus();
    };
    button.addEventListener("click", () => setOpen(panel.hidden));
    $("clip-close").addEventListener("click", () => { setOpen(false); backToConsole(); });
    panel.addEventListener("keydown", (event) => {
        if (event.key === "Escape") { setOpen(false); button.focus(); }
    });

    $("clip-copy").addEventListener("click", async () => {
        outStatus.textContent = (await writeClipboard(fromVm)) ? COPIED : NOT_COPIED;
    });
    $("clip-send").addEventListener("click", () => {
        const rfb = getRfb();
        if (!rfb || !toVm.value) return;
        if (new TextEncoder().encode(toVm.value).length > limit) {
            inStatus.textContent = tooLong(limit);  // the proxy would drop it: say so instead
            return;
        }
        rfb.clipboardPasteFrom(toVm.value);
        inStatus.textContent = SENT;
    });

    return {
        /** Show what the token's policy allows; a view-only console sends nothing. */
        configure(verdict) {
            const directions = clipDirections(verdict.clip);
            allowed = { in: directions.in && !verdict.view_only, out: directions.out };
            if (Number.isInteger(verdict.max_cut_text)) limit = verdict.max_cut_text;
            $("clip-out-section").hidden = !allowed.out;
            $("clip-in-section").hidden = !allowed.in;
            button.hidden = !allowed.in && !allowed.out;
            if (button.hidden) setOpen(false);
        },
        /** Text the VM copied (noVNC's `clipboard` event): into the panel, and the user's clipboard if allowed. */
        async received(text) {
            if (!allowed.out) return;  // the proxy drops it; nothing can arrive, and nothing is shown
            fromVm.value = text;
            outStatus.textContent = (await writeClipboard(null, text)) ? COPIED : NOT_COPIED;
        },
        update(live) {
            button.disabled = !live;
            if (!live) setOpen(false);
        },
    };
}

/** Write to the user's clipboard through the Clipboard API, else the selection and copy command. */
async function writeClipboard(textarea, text = textarea ? textarea.value : "") {
    if (navigator.clipboard && navigator.clipboard.writeText) {
        try {
            await navigator.clipboard.writeText(text);
            return true;
        } catch {
            // not focused, not a secure context, or no permission: try the older way below
        }
    }
    if (!textarea) return false;  // execCommand needs a user's click (the Copy button)
    textarea.select();
    return document.execCommand("copy");
}
