// What the real-browser scripts share (demo.mjs: two Chromium pages; firefox.mjs: Chromium and
// Firefox): their command line, their log and failure, the speech WAV, launching Chromium, and
// driving the demo page. Page helpers take `p = { label, page }` and use only what playwright's
// and puppeteer's pages both have: page.evaluate(fn, arg), page.click(selector), page.goto(url).

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const require = createRequire(import.meta.url);

// -- arguments -----------------------------------------------------------------------------------

// `SERVER_URL [--timeout SECONDS] [--room NAME]` plus `options` (`{ '--wav': 'wav' }`: the value
// after --wav lands in the returned object's `wav`, null when not given). Exits 2 on bad usage.
// `script` (`demo.mjs`) also names the log lines.
export function parseArgs({ script, usage: usageLine, timeoutS, roomName, options = {} }) {
  tag = script.replace(/\.mjs$/, '');
  const usage = (message) => {
    if (message) console.error(`${script}: ${message}`);
    console.error(`usage: ${usageLine}`);
    process.exit(2);
  };
  const parsed = { serverUrl: null, timeoutS, roomName };
  for (const name of Object.values(options)) parsed[name] = null;
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--timeout') parsed.timeoutS = Number(args[++i]);
    else if (a === '--room') parsed.roomName = args[++i];
    else if (Object.hasOwn(options, a)) parsed[options[a]] = args[++i];
    else if (a === '-h' || a === '--help') usage();
    else if (a.startsWith('--')) usage(`unknown option ${a}`);
    else if (parsed.serverUrl === null) parsed.serverUrl = a;
    else usage(`unexpected argument ${a}`);
  }
  if (!parsed.serverUrl) usage('missing SERVER_URL');
  if (!(parsed.timeoutS > 0)) usage('--timeout must be a positive number of seconds');
  parsed.serverUrl = parsed.serverUrl.replace(/\/+$/, '');
  return parsed;
}

export const chromiumPath = process.env.CHROMIUM || '/usr/lib/chromium/chromium';
const espeak = process.env.ESPEAK_NG || 'espeak-ng';
const sox = process.env.SOX || 'sox';

// -- log, failure, the end -----------------------------------------------------------------------

export const started = Date.now();
export const elapsed = () => ((Date.now() - started) / 1000).toFixed(1);
// Names the script in its log lines (`[demo 1.2s] ...`); parseArgs sets it.
let tag = 'browser';
export const log = (...parts) => console.log(`[${tag} ${elapsed()}s]`, ...parts);
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class Failure extends Error {}
export const fail = (message) => {
  throw new Failure(message);
};

// What a script's main starts with: its RESULT so far, the browsers' logs, a work folder (named
// `workPrefix`...), the browsers it opens (for cleanUp), its deadline and the time left to it.
export function begin(workPrefix, { serverUrl, roomName, timeoutS }) {
  const deadline = started + timeoutS * 1000;
  return {
    result: { ok: false, server: serverUrl, room: roomName },
    logs: [],
    work: mkdtempSync(join(tmpdir(), workPrefix)),
    opened: [],
    deadline,
    left: () => Math.max(1000, deadline - Date.now()),
  };
}

// Records `error` in `result` and prints it with the last `lines` of the browsers' logs.
export function reportFailure(result, error, logs, lines) {
  result.ok = false;
  result.error = error instanceof Failure ? error.message : `${error.stack || error}`;
  console.error(`[${tag} ${elapsed()}s] FAIL: ${result.error}`);
  if (logs.length) {
    console.error('--- browser logs ---');
    for (const line of logs.slice(-lines)) console.error(line);
  }
}

// Closes the browsers (last opened first) and removes the work folder.
export async function cleanUp(opened, work) {
  for (const p of opened.reverse()) await p.browser.close().catch(() => {});
  rmSync(work, { recursive: true, force: true });
}

// The last line, `RESULT {json}`, and the exit code that goes with it.
export function exitWith(result) {
  console.log(`RESULT ${JSON.stringify(result)}`);
  process.exit(result.ok ? 0 : 1);
}

// A hard stop 30 s after the script's own timeout, whatever hangs (a browser that does not
// close, a stuck evaluate).
export function hardStop(timeoutS) {
  setTimeout(() => {
    console.error(`[${tag} ${elapsed()}s] FAIL: hard timeout after ${timeoutS + 30} s`);
    exitWith({ ok: false, error: 'hard timeout' });
  }, (timeoutS + 30) * 1000).unref();
}

// -- the speech WAV ------------------------------------------------------------------------------
// FIELD-NOTES "Speech with exact ground truth": each sentence synthesized by espeak-ng, resampled to
// 48 kHz mono 16-bit with sox and trimmed of its silences, with `gapS` of silence before, between
// and after, so the speech boundaries are known to the sample. Chromium's fake capture loops it.

export const RATE = 48000;

function run(cmd, cmdArgs) {
  const r = spawnSync(cmd, cmdArgs, { encoding: 'utf8' });
  if (r.error) fail(`${cmd} could not run: ${r.error.message} (run scripts/browser-deps.sh)`);
  if (r.status !== 0) fail(`${cmd} ${cmdArgs.join(' ')} failed (${r.status}): ${r.stderr.trim()}`);
  return r.stdout;
}

function samplesOf(file) {
  return Number(run(sox, ['--i', '-s', file]).trim());
}

export function makeSpeechWav(dir, sentences, gapS) {
  const parts = [];
  const gap = join(dir, 'gap.wav');
  run(sox, ['-n', '-r', String(RATE), '-c', '1', '-b', '16', gap, 'trim', '0', String(gapS)]);
  parts.push(gap);
  const truth = [];
  let at = samplesOf(gap);
  sentences.forEach((text, i) => {
    const raw = join(dir, `s${i}-raw.wav`);
    const out = join(dir, `s${i}.wav`);
    run(espeak, ['-v', 'en-us', '-s', '150', '-w', raw, text]);
    // Trim leading and trailing silence (below 0.1 % for 10 ms), then resample.
    run(sox, [raw, '-r', String(RATE), '-c', '1', '-b', '16', out,
      'silence', '1', '0.01', '0.1%', 'reverse', 'silence', '1', '0.01', '0.1%', 'reverse']);
    const n = samplesOf(out);
    truth.push({ sentence: i, start_sample: at, end_sample: at + n, seconds: +(n / RATE).toFixed(3) });
    at += n + samplesOf(gap);
    parts.push(out, gap);
  });
  const wav = join(dir, 'speech.wav');
  run(sox, [...parts, wav]);
  return { wav, truth, total_s: +(samplesOf(wav) / RATE).toFixed(3) };
}

// -- browsers ------------------------------------------------------------------------------------

// `require` of a browser driver, at the path in `envName` (scripts/browser-deps.sh prints it).
export function load(envName, name) {
  const where = process.env[envName] || name;
  try {
    return require(where);
  } catch (error) {
    fail(`cannot load ${name} from ${where}: ${error.message} (run scripts/browser-deps.sh and set ${envName})`);
  }
}

function chromiumArgs(fakeAudioFile) {
  const a = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--use-fake-ui-for-media-stream',
    '--use-fake-device-for-media-stream',
    '--autoplay-policy=no-user-gesture-required',
    '--ignore-certificate-errors',
  ];
  if (fakeAudioFile) a.push(`--use-file-for-fake-audio-capture=${fakeAudioFile}`);
  return a;
}

// A headless Chromium (playwright-core's `chromium`) with fake media devices, its microphone
// `fakeAudioFile` when given, and one page whose console, errors, failed requests and WebSockets
// go to `logs`.
export async function openChromiumPage(chromium, label, fakeAudioFile, logs) {
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true, // playwright adds --headless
    args: chromiumArgs(fakeAudioFile),
    // playwright's --mute-audio keeps inbound audioLevel and totalAudioEnergy at 0
    ignoreDefaultArgs: ['--mute-audio'],
    timeout: 30000,
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on('console', (msg) => logs.push(`[${label} console.${msg.type()}] ${msg.text()}`));
  page.on('pageerror', (error) => logs.push(`[${label} pageerror] ${error.message}`));
  page.on('requestfailed', (req) => logs.push(`[${label} requestfailed] ${req.method()} ${req.url().split('?')[0]}: ${req.failure() && req.failure().errorText}`));
  page.on('websocket', (ws) => {
    logs.push(`[${label} websocket] open ${ws.url().split('?')[0]}`);
    ws.on('close', () => logs.push(`[${label} websocket] closed`));
  });
  return { browser, context, page, label };
}

// -- the page ------------------------------------------------------------------------------------

export async function pageError(page) {
  return page.evaluate(() => {
    const el = document.getElementById('error');
    return el && !el.hidden ? document.getElementById('error-text').textContent.trim() : null;
  });
}

// Waits for `fn(arg)` in the page to be truthy, failing early with the page's own error display.
export async function waitFor(p, what, fn, arg, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await p.page.evaluate(fn, arg);
    if (value) return value;
    const error = await pageError(p.page);
    if (error) fail(`${p.label}: ${what}: the page shows an error: ${error}`);
    if (Date.now() > deadline) {
      const status = await p.page.evaluate(() => document.getElementById('status').textContent);
      fail(`${p.label}: ${what}: not within ${(timeoutMs / 1000).toFixed(0)} s (status: "${status}")`);
    }
    await sleep(200);
  }
}

export async function waitRecvConnected(p, what, timeoutMs) {
  await waitFor(p, what, () => window.encore.recvPc && window.encore.recvPc.connectionState === 'connected', null, timeoutMs);
}

export async function waitSendConnected(p, what, timeoutMs) {
  await waitFor(p, what, () => window.encore.sendPc && window.encore.sendPc.connectionState === 'connected', null, timeoutMs);
}

// Sets an input's or a select's value as typing or choosing would (input and change events).
async function setValue(p, selector, value) {
  await p.page.evaluate(([sel, v]) => {
    const el = document.querySelector(sel);
    el.value = v;
    el.dispatchEvent(new Event('input', { bubbles: true }));
    el.dispatchEvent(new Event('change', { bubbles: true }));
  }, [selector, value]);
}

// Opens the page, signs in with the dev form as `name` in `role`, joins `roomName`; returns the
// peer name the page shows.
export async function signInAndJoin(p, { serverUrl, roomName, name, role, timeoutMs }) {
  const response = await p.page.goto(`${serverUrl}/`, { waitUntil: 'load', timeout: timeoutMs });
  if (!response || !response.ok()) fail(`${p.label}: GET / answered ${response ? response.status() : 'nothing'}`);
  await waitFor(p, 'the dev sign-in form', () => {
    const f = document.getElementById('dev-form');
    return f && !f.hidden;
  }, null, timeoutMs);
  await setValue(p, '#dev-name', name);
  await setValue(p, '#dev-role', role);
  await p.page.click('#dev-signin');
  await waitFor(p, 'sign-in', () => document.getElementById('status').dataset.state === 'signed-in', null, timeoutMs);
  await setValue(p, '#room', roomName);
  await p.page.click('#join');
  await waitFor(p, `joining room ${roomName}`, () => document.getElementById('status').dataset.state === 'joined', null, timeoutMs);
  const peer = await p.page.evaluate(() => document.getElementById('my-peer').textContent);
  log(`${p.label}: signed in as ${name} (${role}), joined ${roomName} as peer "${peer}"`);
  return peer;
}

// The send transport as the page's getStats() and SDP show it; null when not talking.
export async function sendSideFacts(page) {
  return page.evaluate(async () => {
    const pc = window.encore.sendPc;
    if (!pc) return null;
    let packetsSent = 0;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'audio') packetsSent += s.packetsSent || 0;
    });
    const uri = 'urn:ietf:params:rtp-hdrext:ssrc-audio-level';
    return {
      connectionState: pc.connectionState,
      packetsSent,
      offerHasAudioLevel: !!(pc.localDescription && pc.localDescription.sdp.includes(uri)),
      answerHasAudioLevel: !!(pc.remoteDescription && pc.remoteDescription.sdp.includes(uri)),
      answerCodecs: pc.remoteDescription
        ? [...new Set([...pc.remoteDescription.sdp.matchAll(/a=rtpmap:\d+ ([^/\r\n]+)/g)].map((m) => m[1]))]
        : [],
    };
  });
}

// What a listening page shows and its receive transport's getStats() say; `level` is its meter
// of `speaker` (0 without one).
export async function listenerFacts(page, speaker = null) {
  return page.evaluate(async (peer) => {
    const audio = document.getElementById('remote-audio');
    const np = document.getElementById('now-playing');
    const meter = peer ? document.querySelector(`[data-testid="level-${CSS.escape(peer)}"]`) : null;
    return {
      stats: await window.encore.recvStats(),
      recvState: window.encore.recvPc ? window.encore.recvPc.connectionState : 'none',
      nowPlaying: np.dataset.utterance || '',
      nowPlayingText: np.textContent,
      nowLive: document.getElementById('now-live').textContent,
      audioPlaying: !!(audio.srcObject && !audio.paused),
      utterances: window.encore.room().utterances.map((u) => u.utterance),
      level: meter ? +meter.value : 0,
    };
  }, speaker);
}

// Matches the utterance ids of `peer` (`<peer>#<n>`).
export function utterancesOf(peer) {
  return new RegExp(`^${peer.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}#\\d+$`);
}
