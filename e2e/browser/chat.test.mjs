// Headless Chromium test of the Parley demo page (gateway/static/index.html).
//
// Needs a running server started with --insecure-dev-login; its base URL comes from PARLEY_URL.
// Normally started by ./run.sh, which also starts the server.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const BASE = process.env.PARLEY_URL;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SCREENSHOT = process.env.PARLEY_SCREENSHOT || "/tmp/parley-demo.png";
const PER_USER = 5;
const WAIT = { timeout: 15_000 };

let browser;
const pageErrors = [];

before(async () => {
  assert.ok(BASE, "PARLEY_URL must be set (use run.sh)");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // playwright-core gives every launch a fresh temporary --user-data-dir.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
});

async function newUserPage(name) {
  const context = await browser.newContext({ viewport: { width: 1180, height: 760 } });
  const page = await context.newPage();
  page.on("pageerror", (error) => pageErrors.push(`${name}: ${error.message}`));
  await page.goto(BASE + "/");
  await login(page, name);
  return page;
}

async function login(page, name) {
  await page.fill("#login-name", name);
  await page.click("#login-button");
  await page.waitForSelector("#app-view:not([hidden])", WAIT);
  // The connection dot turns green when the `ready` frame arrived.
  await page.waitForSelector("#conn-dot.online", WAIT);
}

async function openConversation(page, id) {
  const item = page.locator(`[data-channel="${id}"]`);
  await item.waitFor(WAIT);
  await item.click();
  await page.waitForSelector(`[data-channel="${id}"].active`, WAIT);
}

/** The messages of the selected conversation as the page shows them. */
function shownMessages(page) {
  return page.$$eval("#messages .msg", (nodes) =>
    nodes.map((node) => ({
      seq: Number(node.getAttribute("data-seq")),
      id: node.getAttribute("data-id"),
      text: node.querySelector(".msg-text").textContent,
    })),
  );
}

async function waitForCount(page, count) {
  await page.waitForFunction(
    (n) =>
      document.querySelectorAll("#messages .msg").length >= n &&
      document.querySelectorAll("#messages .pending-msg").length === 0,
    count,
    WAIT,
  );
}

async function sendAll(page, texts) {
  for (const text of texts) {
    await page.fill("#composer", text);
    await page.press("#composer", "Enter");
  }
}

async function noErrorShown(page, who) {
  const status = await page.$eval("#status", (node) => ({ error: node.classList.contains("error"), text: node.textContent }));
  assert.equal(status.error, false, `${who} shows an error: ${status.text}`);
}

test("two users chat in a channel and a DM; history survives a reload", { timeout: 120_000 }, async () => {
  const alice = await newUserPage("alice");
  const bob = await newUserPage("bob");

  // alice creates #general; the page selects it.
  await alice.fill("#new-channel", "general");
  await alice.click("#create-channel");
  await alice.waitForSelector('[data-channel="g:general"].active', WAIT);

  // bob joins it by name.
  await bob.fill("#join-channel", "general");
  await bob.click("#join-button");
  await openConversation(bob, "g:general");
  await openConversation(alice, "g:general");

  // Both send interleaved, concurrently.
  const aliceTexts = Array.from({ length: PER_USER }, (_, i) => `alice says ${i + 1}`);
  const bobTexts = Array.from({ length: PER_USER }, (_, i) => `bob says ${i + 1}`);
  await Promise.all([sendAll(alice, aliceTexts), sendAll(bob, bobTexts)]);

  const total = 2 * PER_USER;
  await Promise.all([waitForCount(alice, total), waitForCount(bob, total)]);
  const onAlice = await shownMessages(alice);
  const onBob = await shownMessages(bob);

  assert.equal(onAlice.length, total, "alice shows every message exactly once");
  assert.deepEqual(onBob, onAlice, "both pages show the same messages in the same order");
  assert.deepEqual(onAlice.map((m) => m.seq), Array.from({ length: total }, (_, i) => i + 1), "seq is 1..N, gap-free");
  assert.deepEqual(
    onAlice.map((m) => m.text).sort(),
    [...aliceTexts, ...bobTexts].sort(),
    "every sent text is shown once",
  );
  assert.equal(new Set(onAlice.map((m) => m.id)).size, total, "message ids are unique");

  // alice opens a DM with bob and writes to him.
  const dm = "dm:alice:bob";
  await alice.fill("#dm-user", "bob");
  await alice.click("#dm-button");
  await alice.waitForSelector(`[data-channel="${dm}"].active`, WAIT);
  const secret = "hi bob, just between us";
  await sendAll(alice, [secret]);
  await waitForCount(alice, 1);

  // bob gets the DM in his list, with an unread badge, and sees the message when he opens it.
  await bob.locator(`[data-channel="${dm}"]`).waitFor(WAIT);
  await bob.waitForSelector(`[data-channel="${dm}"] .badge`, WAIT);
  await openConversation(bob, dm);
  await waitForCount(bob, 1);
  const dmOnBob = await shownMessages(bob);
  assert.deepEqual(dmOnBob.map((m) => [m.seq, m.text]), [[1, secret]]);
  // alice sees her message go sent → delivered → read, and bob online.
  await alice.waitForSelector('.msg.mine[data-seq="1"][data-status="read"]', WAIT);
  assert.equal((await alice.textContent("#conv-sub")).trim(), "online");

  // bob reloads the page, logs in again, and finds the whole history of #general.
  await bob.reload();
  await login(bob, "bob");
  await bob.locator(`[data-channel="${dm}"]`).waitFor(WAIT);
  assert.equal(await bob.locator(`[data-channel="${dm}"] .badge`).count(), 0, "the DM bob read is not unread again");
  await openConversation(bob, "g:general");
  await waitForCount(bob, total);
  const afterReload = await shownMessages(bob);
  assert.deepEqual(afterReload, onAlice, "history after reload matches what was shown live");

  await noErrorShown(alice, "alice");
  await noErrorShown(bob, "bob");
  assert.deepEqual(pageErrors, [], "no JavaScript errors on the pages");

  await bob.screenshot({ path: SCREENSHOT });
  await alice.context().close();
  await bob.context().close();
});
