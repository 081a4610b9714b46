#!/usr/bin/env node
// The demo page in a cluster: open PAGE_URL (one node), sign in (dev mode), join ROOM, which lives
// on another node; the page must follow the `redirect` and end up joined there. Prints one line
// `RESULT {json}` with the WebSocket URLs the page opened (tickets cut off) and its peer name.
//
//   node tests/browser/redirect.mjs PAGE_URL ROOM
//
// Environment: CHROMIUM (default /usr/lib/chromium/chromium), NODE_PATH with playwright-core.

import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const [pageUrl, roomName] = process.argv.slice(2);
if (!pageUrl || !roomName) {
  console.error('usage: node tests/browser/redirect.mjs PAGE_URL ROOM');
  process.exit(2);
}
const { chromium } = require('playwright-core');

const sockets = [];
const logs = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/lib/chromium/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--ignore-certificate-errors'],
  timeout: 30000,
});
let result;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on('console', (msg) => logs.push(`[console.${msg.type()}] ${msg.text()}`));
  page.on('websocket', (ws) => sockets.push(ws.url().split('?')[0]));
  const state = () => page.evaluate(() => document.getElementById('status').dataset.state);
  const waitState = async (want, what) => {
    const deadline = Date.now() + 30000;
    while ((await state()) !== want) {
      if (Date.now() > deadline) throw new Error(`${what}: status still ${await state()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  await page.goto(`${pageUrl}/`, { waitUntil: 'load', timeout: 30000 });
  await page.waitForSelector('#dev-form:not([hidden])', { timeout: 30000 });
  await page.fill('#dev-name', 'pat');
  await page.selectOption('#dev-role', 'speaker');
  await page.click('#dev-signin');
  await waitState('signed-in', 'sign-in');
  await page.fill('#room', roomName);
  await page.click('#join');
  await waitState('joined', `joining ${roomName}`);
  result = { ok: true, sockets, peer: await page.textContent('#my-peer') };
} catch (error) {
  result = { ok: false, error: String(error), sockets, logs };
} finally {
  await browser.close();
}
console.log(`RESULT ${JSON.stringify(result)}`);
process.exit(result.ok ? 0 : 1);
