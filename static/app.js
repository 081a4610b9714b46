// Encore demo page: sign in, join a room, talk, listen to your personal feed.
// Plain JavaScript, no build step; works in current Chromium and Firefox.
// Signaling: docs/protocol.md (version 1). Sign-in: docs/auth.md.
'use strict';

const PROTOCOL = 1;
const REQUEST_TIMEOUT_MS = 20000;
const RECENT_MAX = 30;
const AUDIO_LEVEL_URI = 'urn:ietf:params:rtp-hdrext:ssrc-audio-level';
const NAME_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;
// The sign-in, kept across reloads and tabs as Firebase's web SDK keeps its user (localStorage).
const SESSION_KEY = 'encore.session';
// This tab's room and what it did there (talking, listening), kept across a reload of the tab.
const ROOM_KEY = 'encore.room';
// Reconnecting: the first attempt at once, then doubling up to this, with jitter.
const RECONNECT_FIRST_MS = 250;
const RECONNECT_MAX_MS = 15000;

// ---------------------------------------------------------------------------------------------
// DOM helpers

const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function show(id, visible) {
  $(id).hidden = !visible;
}

function setStatus(state, text) {
  const el = $('status');
  el.dataset.state = state;
  el.textContent = text;
}

// Errors carry a stable `code` (the server's, or one of ours) and a readable message; those of
// an HTTP answer carry its `status` too (401: the credentials were refused).
class EncoreError extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

function showError(error, context) {
  const code = error && error.code ? error.code : 'error';
  const message = error && error.message ? error.message : String(error);
  const text = `${context ? context + ': ' : ''}${message}${code !== 'error' ? ` (${code})` : ''}`;
  console.error('[encore]', text, error);
  $('error-text').textContent = text;
  $('error').dataset.code = code;
  show('error', true);
}

function clearError() {
  show('error', false);
  $('error-text').textContent = '';
  delete $('error').dataset.code;
}

// Runs a user action: clears the previous error, disables the button while it runs, and shows
// whatever it throws.
function action(button, context, fn) {
  return async (event) => {
    if (event) event.preventDefault();
    clearError();
    if (button) button.disabled = true;
    try {
      await fn(event);
    } catch (error) {
      showError(error, context);
    } finally {
      if (button) button.disabled = false;
      render();
    }
  };
}

// ---------------------------------------------------------------------------------------------
// HTTP

async function fetchJson(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new EncoreError('network', `${options.method || 'GET'} ${url.split('?')[0]} failed: ${error.message}`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    // Encore: {"error": {"code", "message"}}; Identity Toolkit: {"error": {"code": 400, "message": "EMAIL_EXISTS"}}.
    const err = body && body.error;
    const code = err && typeof err.code === 'string' ? err.code : `http-${response.status}`;
    const message = err && err.message ? err.message : `${response.status} ${response.statusText}`;
    throw new EncoreError(code, message, response.status);
  }
  return body;
}

// ---------------------------------------------------------------------------------------------
// Auth: dev tokens from the server, or Firebase email/password (real or emulator).

const auth = {
  config: null, // GET /api/client-config
  token: null, // the current ID token; never put in a URL
  expiresAt: 0, // ms since the epoch
  lifetimeMs: 0,
  refreshToken: null, // firebase modes
  uid: null,
  email: null,
  devRole: null, // dev mode: the role asked for, to mint again
  roles: [],
  refreshTimer: null,
};

const FIREBASE_ERRORS = {
  EMAIL_EXISTS: 'an account with this email already exists: sign in instead',
  EMAIL_NOT_FOUND: 'no account with this email',
  INVALID_PASSWORD: 'wrong password',
  INVALID_LOGIN_CREDENTIALS: 'wrong email or password',
  USER_DISABLED: 'this account is disabled',
  TOO_MANY_ATTEMPTS_TRY_LATER: 'too many attempts: try again later',
  TOKEN_EXPIRED: 'the session expired: sign in again',
  INVALID_REFRESH_TOKEN: 'the session is no longer valid: sign in again',
  OPERATION_NOT_ALLOWED: 'email/password sign-in is not enabled for this project',
};

function firebaseEndpoints() {
  const config = auth.config;
  if (config.mode === 'firebase-emulator') {
    const host = config.emulatorHost || '127.0.0.1:9099';
    return {
      identity: `http://${host}/identitytoolkit.googleapis.com/v1`,
      secureToken: `http://${host}/securetoken.googleapis.com/v1`,
      key: config.apiKey || 'fake-api-key',
    };
  }
  if (!config.apiKey) {
    throw new EncoreError('config', 'the server has no web API key (auth.web_api_key): Firebase sign-in is unavailable');
  }
  return {
    identity: 'https://identitytoolkit.googleapis.com/v1',
    secureToken: 'https://securetoken.googleapis.com/v1',
    key: config.apiKey,
  };
}

function firebaseError(error) {
  if (error instanceof EncoreError) {
    const reason = String(error.message).split(' : ')[0].split(':')[0].trim();
    if (FIREBASE_ERRORS[reason]) return new EncoreError(reason, FIREBASE_ERRORS[reason]);
    if (/^WEAK_PASSWORD/.test(reason)) return new EncoreError('WEAK_PASSWORD', 'the password must have at least 6 characters');
  }
  return error;
}

function takeToken(idToken, expiresInS, extra = {}) {
  auth.token = idToken;
  auth.lifetimeMs = Math.max(1, Number(expiresInS) || 3600) * 1000;
  auth.expiresAt = Date.now() + auth.lifetimeMs;
  Object.assign(auth, extra);
  scheduleRefresh();
  saveSession();
}

// Keeps what the sign-in flow allows keeping, as Firebase's web SDK does (its user, ID token and
// refresh token in localStorage): a reload signs in again without asking. Dev mode mints a new
// token for the same uid and role when the kept one has expired.
function saveSession() {
  try {
    localStorage.setItem(SESSION_KEY, JSON.stringify({
      mode: auth.config.mode,
      projectId: auth.config.projectId || null,
      token: auth.token,
      expiresAt: auth.expiresAt,
      lifetimeMs: auth.lifetimeMs,
      refreshToken: auth.refreshToken,
      uid: auth.uid,
      email: auth.email,
      devRole: auth.devRole,
    }));
  } catch {
    // no storage (private mode): a reload asks again
  }
}

function forgetSession() {
  try {
    localStorage.removeItem(SESSION_KEY);
  } catch {
    // no storage
  }
}

// Signs in again from what saveSession kept, if it is for this server's sign-in mode. A token
// the server refuses (after one refresh) signs out; a server out of reach keeps it for later.
async function restoreSession() {
  let saved;
  try {
    saved = JSON.parse(localStorage.getItem(SESSION_KEY) || 'null');
  } catch {
    saved = null;
  }
  if (!saved || !saved.token || saved.mode !== auth.config.mode || (saved.projectId || null) !== (auth.config.projectId || null)) {
    return false;
  }
  Object.assign(auth, {
    token: saved.token,
    expiresAt: Number(saved.expiresAt) || 0,
    lifetimeMs: Number(saved.lifetimeMs) || 3600 * 1000,
    refreshToken: saved.refreshToken || null,
    uid: saved.uid || null,
    email: saved.email || null,
    devRole: saved.devRole || null,
  });
  try {
    if (Date.now() > auth.expiresAt - 60000) await refreshToken();
    else scheduleRefresh();
    await whoamiOrRefresh();
  } catch (error) {
    if (refused(error)) {
      signOut();
      showError(new EncoreError('unauthorized', `the saved sign-in was refused (${error.code}): sign in again`));
      return false;
    }
    throw error;
  }
  setStatus('signed-in', `signed in as ${auth.email || auth.uid}`);
  return true;
}

// The server (401) or Firebase (400 on a bad refresh token) refused the credentials themselves.
function refused(error) {
  return !!error && (error.status === 401 || (error.status === 400 && auth.config.mode !== 'dev'));
}

// whoami, with one fresh token if the server refuses the one we have.
async function whoamiOrRefresh() {
  try {
    await whoami();
  } catch (error) {
    if (error.status !== 401) throw error;
    await refreshToken();
    await whoami();
  }
}

async function signInDev(name, role) {
  if (!NAME_PATTERN.test(name)) {
    throw new EncoreError('bad_request', 'the name must be 1 to 64 letters, digits, "_", "." or "-"');
  }
  const path = auth.config.devTokenPath || '/dev/token';
  const body = await fetchJson(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ uid: name, role }),
  });
  takeToken(body.idToken, body.expiresIn, { uid: body.uid || name, devRole: role, email: null, refreshToken: null });
}

async function signInFirebase(email, password, signUp) {
  const ep = firebaseEndpoints();
  const op = signUp ? 'accounts:signUp' : 'accounts:signInWithPassword';
  const request = { email, password, returnSecureToken: true };
  if (auth.config.tenantId) request.tenantId = auth.config.tenantId;
  let body;
  try {
    body = await fetchJson(`${ep.identity}/${op}?key=${encodeURIComponent(ep.key)}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(request),
    });
  } catch (error) {
    throw firebaseError(error);
  }
  takeToken(body.idToken, body.expiresIn, { uid: body.localId, email: body.email || email, refreshToken: body.refreshToken });
}

// A fresh ID token: dev mode mints again, Firebase exchanges the refresh token.
async function refreshToken() {
  if (!auth.token) return;
  if (auth.config.mode === 'dev') {
    await signInDev(auth.uid, auth.devRole);
  } else {
    const ep = firebaseEndpoints();
    let body;
    try {
      body = await fetchJson(`${ep.secureToken}/token?key=${encodeURIComponent(ep.key)}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: auth.refreshToken }).toString(),
      });
    } catch (error) {
      throw firebaseError(error);
    }
    takeToken(body.id_token, body.expires_in, { uid: body.user_id || auth.uid, refreshToken: body.refresh_token });
  }
  // A live session gets the new token too, or the server closes it at expiry (code 4001).
  if (room.sig && room.sig.isOpen) {
    const data = await room.sig.request('reauth', { token: auth.token });
    room.sessionExpiresAt = data && data.session_expires_at;
  }
}

// Refresh about 5 minutes before expiry (earlier for short-lived dev tokens).
function scheduleRefresh() {
  clearTimeout(auth.refreshTimer);
  const lead = Math.min(5 * 60 * 1000, auth.lifetimeMs / 4);
  const delay = Math.max(5000, auth.expiresAt - lead - Date.now());
  auth.refreshTimer = setTimeout(() => {
    refreshToken().catch((error) => {
      showError(error, 'refreshing the sign-in');
      auth.refreshTimer = setTimeout(() => scheduleRefresh(), 30000);
    }).finally(render);
  }, delay);
}

async function whoami() {
  const user = await fetchJson('/api/whoami', { headers: { Authorization: `Bearer ${auth.token}` } });
  auth.roles = Array.isArray(user.roles) ? user.roles : [];
  if (user.uid) auth.uid = user.uid;
}

function signOut() {
  leaveRoom('signed out');
  forgetSession();
  clearTimeout(auth.refreshTimer);
  Object.assign(auth, { token: null, expiresAt: 0, refreshToken: null, uid: null, email: null, devRole: null, roles: [] });
  setStatus('signed-out', 'signed out');
}

// ---------------------------------------------------------------------------------------------
// Signaling: one WebSocket, requests with ids answered {id, ok, data|error}, notifications.

class Signaling {
  constructor() {
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.handlers = new Map();
    this.onclose = null;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  // Opens the socket and resolves with the `welcome` notification.
  connect(url) {
    return new Promise((resolve, reject) => {
      let welcomed = false;
      const ws = new WebSocket(url);
      this.ws = ws;
      const timer = setTimeout(() => {
        if (!welcomed) {
          reject(new EncoreError('timeout', 'no welcome from the server within 15 s'));
          ws.close();
        }
      }, 15000);
      ws.onmessage = (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch {
          console.warn('[encore] not JSON from the server', event.data);
          return;
        }
        if (!welcomed && message.type === 'welcome') {
          welcomed = true;
          clearTimeout(timer);
          if (message.protocol !== PROTOCOL) {
            console.warn(`[encore] server speaks protocol ${message.protocol}, this page ${PROTOCOL}`);
          }
          resolve(message);
          return;
        }
        this.dispatch(message);
      };
      ws.onclose = (event) => {
        clearTimeout(timer);
        const reason = closeReason(event);
        for (const { reject: fail, timer: t } of this.pending.values()) {
          clearTimeout(t);
          fail(new EncoreError('closed', `the connection closed: ${reason}`));
        }
        this.pending.clear();
        if (!welcomed) {
          reject(new EncoreError('closed', `the server refused or closed the connection: ${reason}`));
        } else if (this.onclose) {
          this.onclose(event, reason);
        }
      };
      ws.onerror = () => {
        // The browser tells nothing more (a refused upgrade is a 401 we cannot read); onclose follows.
      };
    });
  }

  dispatch(message) {
    if (message === null || typeof message !== 'object') return;
    if (message.id !== undefined && message.id !== null && 'ok' in message) {
      const pending = this.pending.get(message.id);
      if (!pending) return;
      this.pending.delete(message.id);
      clearTimeout(pending.timer);
      if (message.ok) {
        pending.resolve(message.data === undefined ? {} : message.data);
      } else {
        const err = message.error || {};
        const error = new EncoreError(err.code || 'internal', err.message || `${pending.type} failed`);
        // In a cluster, a join can be sent to the room's node (see openRoom).
        if (err.code === 'redirect' && err.redirect && typeof err.redirect === 'object') error.redirect = err.redirect;
        pending.reject(error);
      }
      return;
    }
    const handler = this.handlers.get(message.type);
    if (handler) {
      try {
        handler(message);
      } catch (error) {
        showError(error, `handling ${message.type}`);
      }
    } else {
      console.debug('[encore] unhandled notification', message);
    }
  }

  on(type, handler) {
    this.handlers.set(type, handler);
  }

  request(type, fields = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
    if (!this.isOpen) return Promise.reject(new EncoreError('closed', 'not connected'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new EncoreError('timeout', `no answer to ${type} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, type });
      this.ws.send(JSON.stringify({ id, type, ...fields }));
    });
  }

  close(code = 1000, reason = '') {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(code, reason);
  }
}

function closeReason(event) {
  const known = {
    1000: 'closed',
    1001: 'the server is going away',
    1006: 'connection lost',
    1008: 'policy violation',
    1009: 'message too big',
    1011: 'server error',
    4001: 'the session expired: sign in again',
  };
  const text = event.reason || known[event.code] || 'closed';
  return `${text} (code ${event.code})`;
}

// ---------------------------------------------------------------------------------------------
// WebRTC transports: `send` (we offer) and `recv` (the server offers). The server is ICE-lite:
// its candidates are in its SDP, and it learns ours from our connectivity checks, so there is
// nothing to trickle either way.

function remoteSdp(value) {
  if (typeof value === 'string') return value;
  if (value && typeof value.sdp === 'string') return value.sdp;
  throw new EncoreError('bad_request', 'the server sent no SDP');
}

class Transport {
  constructor(kind, iceServers, onState) {
    this.kind = kind;
    this.pc = new RTCPeerConnection({ iceServers, bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' });
    this.closed = false;
    this.pc.onconnectionstatechange = () => {
      onState(this.pc.connectionState);
      if (this.pc.connectionState === 'failed' && !this.closed) {
        showError(new EncoreError('ice_failed', `the ${kind} transport failed (no network path to the server's media ports?)`));
      }
    };
    onState(this.pc.connectionState);
  }

  close() {
    this.closed = true;
    try {
      this.pc.close();
    } catch {
      // already closed
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Room state

const room = {
  sig: null,
  name: null, // room name
  peer: null, // our peer name in the room
  roles: [],
  iceServers: [],
  sessionExpiresAt: null,
  peers: new Map(), // peer -> {peer, uid, roles, publishing}
  follow: new Set(),
  mute: new Set(),
  send: null, // Transport
  sendCamera: false, // the send transport carries the camera too
  localStream: null,
  micPaused: false,
  mutedBy: null, // the moderator whose mute holds our microphone (`muted` / `unmuted` notices)
  recv: null, // Transport
  recvVideo: false, // the receive transport carries video too
  recvPaused: false,
  removedBy: null, // set by a `removed` notification, before the server closes the socket
  nowPlaying: null, // the last now_playing notification
  upNext: [], // what plays next, best first (the last up_next notification's queue)
  upNextAt: 0, // when it came (Date.now()), to age its utterances
  dominant: null, // who dominates the room now (dominant_speaker notifications)
  hands: [], // peers whose hands are raised, in order (hands notifications)
  invitedBy: null, // the moderator whose invitation to speak waits for an answer
  stageNote: null, // the last change on the stage that concerns us, in words
  audience: null, // {live, behind}: who hears us now (audience notifications)
  levels: {}, // peer -> loudest level (0..127) of the last quarter second (levels notifications)
  utterances: new Map(), // id -> {utterance, speaker, live, duration_ms, reason, order}
  utteranceOrder: 0,
  statsTimer: null,
  lastStats: null,
};

function mayPublish() {
  return room.roles.some((r) => r === 'speaker' || r === 'admin');
}

function mayModerate() {
  return room.roles.some((r) => r === 'moderator' || r === 'admin');
}

async function joinRoom(roomName) {
  if (!NAME_PATTERN.test(roomName)) {
    throw new EncoreError('bad_request', 'the room name must be 1 to 64 letters, digits, "_", "." or "-"');
  }
  if (!auth.token) throw new EncoreError('unauthorized', 'sign in first');
  stopReconnecting();
  setStatus('connecting', 'connecting…');
  try {
    await openRoom(roomName);
  } catch (error) {
    if (!auth.token) throw error; // signed out: the token was refused
    setStatus('disconnected', 'not in a room');
    throw error;
  }
}

// A WebSocket ticket for the current token. A token the server refuses (401) gets one fresh
// token (dev mode mints again, Firebase exchanges the refresh token); refused again, or refused
// a fresh one, it signs out: that is the one failure a reconnect cannot outwait.
async function wsTicket() {
  if (Date.now() > auth.expiresAt - 30000) await refreshOrSignOut();
  const ask = () => fetchJson('/api/ws-ticket', { method: 'POST', headers: { Authorization: `Bearer ${auth.token}` } });
  try {
    return await ask();
  } catch (error) {
    if (error.status !== 401) throw error;
  }
  await refreshOrSignOut();
  try {
    return await ask();
  } catch (error) {
    if (error.status === 401) tokenRefused(error);
    throw error;
  }
}

async function refreshOrSignOut() {
  try {
    await refreshToken();
  } catch (error) {
    if (refused(error)) tokenRefused(error);
    throw error;
  }
}

function tokenRefused(error) {
  signOut();
  const why = new EncoreError('unauthorized', `the server refused the sign-in (${error.code}): sign in again`);
  showError(why);
  throw why;
}

// A join follows at most this many redirects (in a cluster, one is enough).
const MAX_REDIRECTS = 3;

// The WebSocket URL of a node's HTTPS base URL (a redirect's `url`), with a ticket.
function wsUrl(base, ticket) {
  const url = new URL('/ws', base);
  url.protocol = url.protocol === 'http:' ? 'ws:' : 'wss:';
  url.searchParams.set('ticket', ticket);
  return url.toString();
}

// Opens a session and joins `roomName` in it, following the cluster's redirects to the node
// where the room lives (docs/protocol.md). Throws (and leaves nothing open) on failure.
async function openRoom(roomName) {
  const { ticket } = await wsTicket();
  let url = wsUrl(location.origin, ticket);
  for (let hop = 0; ; hop += 1) {
    try {
      return await openRoomAt(url, roomName);
    } catch (error) {
      if (error.code !== 'redirect' || !error.redirect || hop >= MAX_REDIRECTS) throw error;
      const { url: base, node, ticket: next } = error.redirect;
      if (typeof base !== 'string' || typeof next !== 'string') throw error;
      console.info(`[encore] room ${roomName} lives on node ${node}: joining it there`);
      url = wsUrl(base, next);
    }
  }
}

async function openRoomAt(url, roomName) {
  const sig = new Signaling();
  installHandlers(sig);
  room.sig = sig;
  let welcome;
  try {
    welcome = await sig.connect(url);
  } catch (error) {
    if (room.sig === sig) room.sig = null;
    throw error;
  }
  room.roles = Array.isArray(welcome.roles) ? welcome.roles : auth.roles;
  room.sessionExpiresAt = welcome.session_expires_at || null;
  sig.onclose = (event, reason) => sessionClosed(sig, event, reason);

  const display = auth.config.mode === 'dev' ? auth.uid : displayNameFromEmail(auth.email);
  const fields = { room: roomName };
  if (display) fields.name = display;
  let data;
  try {
    data = await sig.request('join', fields);
  } catch (error) {
    if (room.sig === sig) room.sig = null;
    sig.close();
    cleanupRoom();
    throw error;
  }
  room.name = data.room;
  room.peer = data.peer;
  room.roles = data.roles;
  room.iceServers = sanitizeIceServers(data.ice_servers);
  room.mutedBy = data.muted_by || null;
  room.peers.clear();
  for (const p of data.peers || []) {
    if (p && p.peer) room.peers.set(p.peer, { ...p });
  }
  setStatus('joined', `in room ${room.name} as ${room.peer}`);
  saveRoom();
}

// The session closed without our asking: removed by a moderator, it stays out; otherwise
// (a dropped connection, a server restart or shutdown, an expired session) it reconnects.
function sessionClosed(sig, event, reason) {
  if (room.sig !== sig) return;
  const removedBy = room.removedBy;
  const want = wanted();
  room.sig = null;
  cleanupRoom();
  if (removedBy) {
    forgetRoom();
    setStatus('disconnected', `removed by ${removedBy}`);
  } else {
    console.info(`[encore] the connection closed (${reason}); reconnecting`);
    scheduleReconnect(want, reason);
  }
  render();
}

// What this tab does in its room, to do again after a reconnect or a reload.
function wanted() {
  return {
    name: room.name,
    talking: !!room.send,
    camera: room.sendCamera,
    micPaused: !!room.send && room.micPaused && !room.mutedBy,
    listening: !!room.recv,
    video: room.recvVideo,
    follow: [...room.follow],
    mute: [...room.mute],
  };
}

function saveRoom() {
  // The address bar holds the room's shareable link.
  if (room.name && new URLSearchParams(location.search).get('room') !== room.name) {
    history.replaceState(null, '', `${location.pathname}?room=${encodeURIComponent(room.name)}`);
  }
  try {
    if (room.name) sessionStorage.setItem(ROOM_KEY, JSON.stringify(wanted()));
  } catch {
    // no storage
  }
}

function forgetRoom() {
  try {
    sessionStorage.removeItem(ROOM_KEY);
  } catch {
    // no storage
  }
}

function savedRoom() {
  try {
    const want = JSON.parse(sessionStorage.getItem(ROOM_KEY) || 'null');
    return want && typeof want.name === 'string' && NAME_PATTERN.test(want.name) ? want : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Reconnecting: new ticket, join again, then talk and listen again as before, with backoff.

const reconnect = {
  want: null, // what to get back to (see wanted()), while reconnecting
  attempt: 0,
  timer: null,
  last: '', // why the last attempt failed, or why the connection closed
  done: 0, // reconnects that succeeded since the page loaded
};

function scheduleReconnect(want, why) {
  reconnect.want = want;
  reconnect.last = why || '';
  const base = reconnect.attempt === 0 ? RECONNECT_FIRST_MS : Math.min(RECONNECT_MAX_MS, 1000 * 2 ** (reconnect.attempt - 1));
  const delay = Math.round(base * (0.8 + Math.random() * 0.4));
  reconnect.attempt += 1;
  setStatus('reconnecting', `reconnecting to ${want.name}…`);
  clearTimeout(reconnect.timer);
  reconnect.timer = setTimeout(() => {
    reconnectOnce(want).finally(render);
  }, delay);
  render();
}

function stopReconnecting() {
  clearTimeout(reconnect.timer);
  Object.assign(reconnect, { want: null, attempt: 0, timer: null, last: '' }); // `done` stays
}

async function reconnectOnce(want) {
  if (reconnect.want !== want || !auth.token) return;
  try {
    await openRoom(want.name);
  } catch (error) {
    if (!auth.token) return; // the token was refused: signed out, and told why
    if (reconnect.want !== want) return; // cancelled meanwhile
    scheduleReconnect(want, error.message);
    return;
  }
  if (reconnect.want !== want) return;
  stopReconnecting();
  reconnect.done += 1;
  await restore(want);
}

// After a (re)join: the same preferences, listening and talking as before.
async function restore(want) {
  room.follow = new Set(want.follow || []);
  room.mute = new Set(want.mute || []);
  try {
    if (room.follow.size || room.mute.size) await sendPrefs();
    if (want.listening) await startListening(!!want.video);
    if (want.talking && mayPublish()) {
      await startTalking(!!want.camera);
      if (want.micPaused && !room.micPaused) await toggleMic();
    }
  } catch (error) {
    showError(error, 'getting back to where you were');
  }
  saveRoom();
}

function displayNameFromEmail(email) {
  if (!email) return null;
  const local = email.split('@')[0].replace(/[^A-Za-z0-9_.-]/g, '').slice(0, 64);
  return local || null;
}

function sanitizeIceServers(list) {
  if (!Array.isArray(list)) return [];
  return list.filter((s) => s && (typeof s.urls === 'string' || Array.isArray(s.urls)));
}

function leaveRoom(why) {
  stopReconnecting();
  forgetRoom();
  const sig = room.sig;
  room.sig = null;
  if (sig && sig.isOpen) {
    sig.request('leave', {}, 3000).catch(() => {}).finally(() => sig.close(1000, why || 'leave'));
  }
  cleanupRoom();
  setStatus(auth.token ? 'signed-in' : 'signed-out', auth.token ? `signed in as ${auth.uid}` : 'signed out');
}

function cleanupRoom() {
  stopTalkingLocally();
  stopListeningLocally();
  room.name = null;
  room.peer = null;
  room.peers.clear();
  room.nowPlaying = null;
  room.upNext = [];
  room.dominant = null;
  room.hands = [];
  room.invitedBy = null;
  room.stageNote = null;
  room.audience = null;
  room.levels = {};
  room.utterances.clear();
  room.removedBy = null;
  room.mutedBy = null;
}

function installHandlers(sig) {
  sig.on('peer_joined', (m) => {
    room.peers.set(m.peer, { peer: m.peer, uid: m.uid, roles: m.roles, publishing: false });
    render();
  });
  sig.on('peer_left', (m) => {
    room.peers.delete(m.peer);
    render();
  });
  sig.on('publishing', (m) => {
    const p = room.peers.get(m.peer) || { peer: m.peer, roles: [] };
    p.publishing = !!m.publishing;
    room.peers.set(m.peer, p);
    render();
  });
  sig.on('now_playing', (m) => {
    // What played before ends here: heard to the end, skipped, or cut for something else.
    const before = room.nowPlaying && room.nowPlaying.utterance;
    if (before && before !== m.utterance) {
      const mark = { finished: 'heard', skip: 'skipped', switch: 'cut', switch_at_pause: 'cut', evicted: 'cut', muted: 'skipped' }[m.reason];
      if (mark) touchUtterance(before).mark = mark;
    }
    if (m.utterance) touchUtterance(m.utterance, m.speaker).played = true;
    room.nowPlaying = m;
    if (m.utterance) {
      const u = touchUtterance(m.utterance, m.speaker);
      u.live = !!m.live;
    }
    render();
  });
  sig.on('up_next', (m) => {
    room.upNext = m.queue || [];
    room.upNextAt = Date.now();
    renderUpNext();
  });
  sig.on('dominant_speaker', (m) => {
    room.dominant = m.speaker || null;
    render();
  });
  sig.on('utterance_started', (m) => {
    const u = touchUtterance(m.utterance, m.speaker);
    u.live = true;
    render();
  });
  sig.on('utterance_ended', (m) => {
    const u = touchUtterance(m.utterance, m.speaker);
    u.live = false;
    u.duration_ms = m.duration_ms;
    u.reason = m.reason;
    if (room.nowPlaying && room.nowPlaying.utterance === m.utterance) room.nowPlaying = { ...room.nowPlaying, live: false };
    render();
  });
  sig.on('levels', (m) => {
    room.levels = m.levels || {};
    renderLevels();
  });
  sig.on('audience', (m) => {
    room.audience = { live: m.live || 0, behind: m.behind || 0 };
    render();
  });
  sig.on('hands', (m) => {
    room.hands = m.raised || [];
    render();
  });
  sig.on('invited', (m) => {
    room.invitedBy = m.by;
    render();
  });
  sig.on('invite_declined', (m) => {
    room.stageNote = `${m.peer} declined your invitation to speak`;
    render();
  });
  sig.on('role_changed', (m) => {
    const p = room.peers.get(m.peer);
    if (p) p.roles = m.roles;
    if (m.peer === room.peer) {
      room.roles = m.roles;
      // The server closed our send transport if we may no longer publish; close our side.
      if (!mayPublish() && room.send) stopTalkingLocally();
      // An admin changed our account's role: a fresh token carries it.
      if (m.reason === 'account') refreshToken().catch((error) => showError(error, 'refreshing the sign-in'));
      const why = { invited: 'you may speak in this room now', moved_to_audience: 'a moderator moved you back to the audience', account: 'an admin changed your role' }[m.reason];
      if (why) room.stageNote = `${why} (${m.roles.join(', ')})`;
    }
    render();
  });
  sig.on('session_expiring', () => {
    refreshToken().catch((error) => showError(error, 'refreshing the sign-in')).finally(render);
  });
  sig.on('muted', (m) => {
    // A moderator muted us: the server stopped forwarding our microphone and refuses our
    // `resume` until a moderator lifts it. The mic button is disabled meanwhile, with the reason.
    room.mutedBy = m.by || 'a moderator';
    room.micPaused = true;
    for (const track of room.localStream ? room.localStream.getAudioTracks() : []) track.enabled = false;
    render();
  });
  sig.on('unmuted', () => {
    // A moderator lifted it: the server forwards our microphone again.
    room.mutedBy = null;
    room.micPaused = false;
    for (const track of room.localStream ? room.localStream.getAudioTracks() : []) track.enabled = true;
    render();
  });
  sig.on('peer_muted', (m) => {
    const p = room.peers.get(m.peer);
    if (p) p.muted_by = m.muted ? m.by : null;
    render();
  });
  sig.on('removed', (m) => {
    room.removedBy = m.by;
    showError(new EncoreError('removed', `${room.removedBy} removed you from the room`));
  });
  sig.on('going_away', (m) => {
    // The server stops (it drained, or it was told to stop now); the socket closes next (1001)
    // and the page reconnects by itself.
    console.info(`[encore] the server is going away (${m.reason}); the page will reconnect`);
  });
  sig.on('error', (m) => {
    if (m.code === 'transport_failed') {
      // The server dropped that transport. If we had closed it ourselves, that is no news;
      // otherwise close our side too, so Talk or Listen can start again.
      const side = m.transport;
      const live = side === 'recv' ? room.recv : side === 'send' ? room.send : null;
      if (side && !live) return;
      if (side === 'recv') stopListeningLocally();
      if (side === 'send') stopTalkingLocally();
    }
    showError(new EncoreError(m.code || 'internal', m.message || 'server error'));
    render();
  });
}

function touchUtterance(id, speaker) {
  let u = room.utterances.get(id);
  if (!u) {
    u = { utterance: id, speaker: speaker || id.split('#')[0], live: false, order: room.utteranceOrder++ };
    room.utterances.set(id, u);
    if (room.utterances.size > RECENT_MAX) {
      const oldest = [...room.utterances.values()].sort((a, b) => a.order - b.order)[0];
      room.utterances.delete(oldest.utterance);
    }
  }
  return u;
}

// ---------------------------------------------------------------------------------------------
// Talk: publish the microphone (and optionally the camera) on the send transport.

async function startTalking(withCamera) {
  if (!room.sig) throw new EncoreError('conflict', 'join a room first');
  if (room.send) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new EncoreError('unsupported', 'this browser gives no microphone access here (the page needs HTTPS)');
  }
  let stream;
  try {
    const device = $('mic-device').value;
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, ...(device ? { deviceId: { exact: device } } : {}) },
      video: withCamera ? { width: { ideal: 640 }, height: { ideal: 360 }, frameRate: { ideal: 24 } } : false,
    });
  } catch (error) {
    throw new EncoreError('media', `no access to the ${withCamera ? 'microphone or camera' : 'microphone'}: ${error.message || error.name}`);
  }
  room.localStream = stream;
  startMeter(stream);
  listMicrophones().catch(() => {});
  const transport = new Transport('send', room.iceServers, (s) => setTransportState('send-state', s));
  room.send = transport;
  try {
    const pc = transport.pc;
    for (const track of stream.getTracks()) {
      const transceiver = pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
      if (track.kind === 'video') preferCodec(transceiver, 'video/VP8');
      if (track.kind === 'audio') preferCodec(transceiver, 'audio/opus');
    }
    const offer = await pc.createOffer();
    if (!offer.sdp.includes(AUDIO_LEVEL_URI)) {
      // Chromium and Firefox both offer it; without it the server detects voice less well.
      console.warn('[encore] the offer lacks the audio-level header extension');
    }
    await pc.setLocalDescription(offer);
    const data = await room.sig.request('publish', { offer: pc.localDescription.sdp });
    if (transport.closed) return;
    await pc.setRemoteDescription({ type: 'answer', sdp: remoteSdp(data.answer) });
    room.sendCamera = !!withCamera;
    // A moderator's mute holds across a new publish: the server drops the microphone anyway;
    // the page says so and keeps the track silent.
    room.micPaused = !!room.mutedBy;
    for (const track of stream.getAudioTracks()) track.enabled = !room.mutedBy;
    const video = $('local-video');
    if (withCamera) {
      video.srcObject = stream;
      video.hidden = false;
    }
  } catch (error) {
    stopTalkingLocally();
    throw error;
  }
}

function preferCodec(transceiver, mimeType) {
  try {
    if (!transceiver.setCodecPreferences || !RTCRtpSender.getCapabilities) return;
    const caps = RTCRtpSender.getCapabilities(mimeType.split('/')[0]);
    if (!caps) return;
    const wanted = caps.codecs.filter((c) => c.mimeType.toLowerCase() === mimeType.toLowerCase());
    if (!wanted.length) return;
    const rest = caps.codecs.filter((c) => c.mimeType.toLowerCase() !== mimeType.toLowerCase());
    transceiver.setCodecPreferences([...wanted, ...rest]);
  } catch (error) {
    console.debug('[encore] setCodecPreferences', error);
  }
}

async function stopTalking() {
  const sig = room.sig;
  const wasPublishing = !!room.send;
  stopTalkingLocally();
  if (sig && wasPublishing) await sig.request('unpublish');
}

// The microphone's level, live: an analyser on the local stream, drawn into #mic-level.
const meter = { ctx: null, source: null, timer: null, stream: null };

function startMeter(stream) {
  stopMeter();
  const Ctx = window.AudioContext || window.webkitAudioContext;
  if (!Ctx || !stream.getAudioTracks().length) return;
  meter.ctx = meter.ctx || new Ctx();
  meter.stream = stream;
  meter.source = meter.ctx.createMediaStreamSource(stream);
  const analyser = meter.ctx.createAnalyser();
  analyser.fftSize = 512;
  meter.source.connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const bar = $('mic-level');
  bar.hidden = false;
  meter.timer = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const v of samples) sum += v * v;
    // RMS in dBFS, shown from -60 dB (nothing) to 0 dB (full).
    const db = 10 * Math.log10(sum / samples.length + 1e-12);
    const level = Math.max(0, Math.min(1, (db + 60) / 60));
    bar.value = level;
    bar.dataset.level = level.toFixed(2);
  }, 100);
}

function stopMeter() {
  clearInterval(meter.timer);
  meter.timer = null;
  if (meter.source) meter.source.disconnect();
  meter.source = null;
  if (meter.stream && meter.stream !== room.localStream) for (const t of meter.stream.getTracks()) t.stop();
  meter.stream = null;
  const bar = $('mic-level');
  bar.hidden = true;
  bar.value = 0;
}

// Before talking: open the chosen microphone only to see its level.
async function checkMicrophone() {
  if (meter.stream) {
    stopMeter();
    return;
  }
  const device = $('mic-device').value;
  const stream = await navigator.mediaDevices.getUserMedia({ audio: device ? { deviceId: { exact: device } } : true });
  startMeter(stream);
  await listMicrophones();
}

// The microphones the browser names (labels appear once access was granted).
async function listMicrophones() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const select = $('mic-device');
  const chosen = select.value;
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === 'audioinput');
  select.replaceChildren(h('option', { value: '' }, 'default microphone'),
    ...devices.filter((d) => d.deviceId && d.deviceId !== 'default').map((d, i) => h('option', { value: d.deviceId }, d.label || `microphone ${i + 1}`)));
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : '';
}

function stopTalkingLocally() {
  stopMeter();
  if (room.send) room.send.close();
  room.send = null;
  if (room.localStream) for (const track of room.localStream.getTracks()) track.stop();
  room.localStream = null;
  room.micPaused = false;
  const video = $('local-video');
  video.srcObject = null;
  video.hidden = true;
  setTransportState('send-state', 'closed');
}

async function toggleMic() {
  if (!room.send) return;
  const pause = !room.micPaused;
  if (!pause && room.mutedBy) throw new EncoreError('forbidden', `${room.mutedBy} (a moderator) muted your microphone; only a moderator can unmute it`);
  await room.sig.request(pause ? 'pause' : 'resume', { transport: 'send' });
  room.micPaused = pause;
  for (const track of room.localStream ? room.localStream.getAudioTracks() : []) track.enabled = !pause;
}

// ---------------------------------------------------------------------------------------------
// Listen: the server offers the personal stream on the receive transport.

async function startListening(withVideo) {
  if (!room.sig) throw new EncoreError('conflict', 'join a room first');
  if (room.recv) return;
  const transport = new Transport('recv', room.iceServers, (s) => setTransportState('recv-state', s));
  room.recv = transport;
  const pc = transport.pc;
  pc.ontrack = (event) => attachRemoteTrack(event);
  try {
    const data = await room.sig.request('listen', { video: !!withVideo });
    if (transport.closed) return;
    await pc.setRemoteDescription({ type: 'offer', sdp: remoteSdp(data.offer) });
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    await room.sig.request('answer', { answer: pc.localDescription.sdp });
    room.recvPaused = false;
    room.recvVideo = !!withVideo;
    startStats();
  } catch (error) {
    stopListeningLocally();
    throw error;
  }
}

function attachRemoteTrack(event) {
  const track = event.track;
  const el = track.kind === 'video' ? $('remote-video') : $('remote-audio');
  let stream = el.srcObject;
  if (!(stream instanceof MediaStream)) {
    stream = new MediaStream();
    el.srcObject = stream;
  }
  for (const old of stream.getTracks()) if (old.kind === track.kind) stream.removeTrack(old);
  stream.addTrack(track);
  if (track.kind === 'video') el.hidden = false;
  playElement(el);
}

// Autoplay: the Listen click usually allows it; if the browser still refuses, the next click
// anywhere starts playback.
function playElement(el) {
  const p = el.play();
  if (p && p.catch) {
    p.catch((error) => {
      if (error && error.name === 'AbortError') return;
      showError(new EncoreError('autoplay', 'the browser blocked playback: click anywhere on the page to hear the feed'));
      document.addEventListener('click', () => el.play().then(clearError).catch(() => {}), { once: true });
    });
  }
}

function stopListeningLocally() {
  if (room.recv) room.recv.close();
  room.recv = null;
  room.recvPaused = false;
  stopStats();
  for (const id of ['remote-audio', 'remote-video']) {
    const el = $(id);
    el.pause();
    el.srcObject = null;
  }
  $('remote-video').hidden = true;
  setTransportState('recv-state', 'closed');
}

// Ends the personal stream: `unlisten` (the counterpart of `unpublish`) closes the server's side.
async function stopListening() {
  const sig = room.sig;
  const had = !!room.recv;
  stopListeningLocally();
  if (!sig || !had) return;
  await sig.request('unlisten');
}

async function toggleListening() {
  if (!room.recv) return;
  const pause = !room.recvPaused;
  await room.sig.request(pause ? 'pause' : 'resume', { transport: 'recv' });
  room.recvPaused = pause;
}

async function feedback(signal, utterance) {
  const fields = { signal };
  if (utterance) fields.utterance = utterance;
  await room.sig.request('feedback', fields);
  // Seen: a liked utterance says so; a skipped one is marked where it ends.
  if (utterance && signal === 'like') {
    touchUtterance(utterance).liked = true;
    render();
  }
}

async function sendPrefs() {
  await room.sig.request('prefs', { follow: [...room.follow], mute: [...room.mute] });
}

async function togglePref(set, peer) {
  const had = set.has(peer);
  if (had) set.delete(peer);
  else set.add(peer);
  try {
    await sendPrefs();
  } catch (error) {
    if (had) set.add(peer);
    else set.delete(peer);
    throw error;
  }
}

// Inbound audio as getStats() sees it (the test reads this too).
async function recvStats() {
  if (!room.recv) return null;
  const report = await room.recv.pc.getStats();
  const out = { audio: null, video: null };
  report.forEach((s) => {
    if (s.type === 'inbound-rtp' && (s.kind === 'audio' || s.mediaType === 'audio')) {
      out.audio = {
        packetsReceived: s.packetsReceived || 0,
        packetsLost: s.packetsLost || 0,
        bytesReceived: s.bytesReceived || 0,
        totalAudioEnergy: s.totalAudioEnergy || 0,
        audioLevel: s.audioLevel || 0,
        totalSamplesReceived: s.totalSamplesReceived || 0,
        concealedSamples: s.concealedSamples || 0,
        jitter: s.jitter || 0,
        ssrc: s.ssrc,
      };
    }
    if (s.type === 'inbound-rtp' && (s.kind === 'video' || s.mediaType === 'video')) {
      out.video = { packetsReceived: s.packetsReceived || 0, framesDecoded: s.framesDecoded || 0 };
    }
  });
  return out;
}

function startStats() {
  stopStats();
  room.statsTimer = setInterval(async () => {
    try {
      room.lastStats = await recvStats();
    } catch {
      room.lastStats = null;
    }
    renderStats();
  }, 1000);
}

function stopStats() {
  clearInterval(room.statsTimer);
  room.statsTimer = null;
  room.lastStats = null;
  renderStats();
}

// ---------------------------------------------------------------------------------------------
// Rendering

function setTransportState(id, state) {
  const el = $(id);
  el.textContent = state;
  el.dataset.state = state;
}

function renderStats() {
  const el = $('recv-stats');
  const s = room.lastStats;
  if (!s || !s.audio) {
    el.textContent = '';
    return;
  }
  const a = s.audio;
  let text = `· ${a.packetsReceived} audio packets, level ${a.audioLevel.toFixed(3)}, energy ${a.totalAudioEnergy.toFixed(3)}`;
  if (s.video) text += ` · ${s.video.framesDecoded} video frames`;
  el.textContent = text;
  el.dataset.packets = String(a.packetsReceived);
}

// Why the route changed (the trace's reasons), as a listener would say it.
const REASONS = {
  new_utterance: 'someone started talking',
  switch: 'the recommender found something you will like more',
  switch_at_pause: 'the recommender found something you will like more, and waited for a pause',
  resume_cut: 'back to what that interrupted, from where it stopped',
  started_listening: 'you started listening',
  finished: 'what played before finished',
  skip: 'you skipped what played before',
  evicted: 'what played before was dropped from the buffer',
  muted: 'you chose not to hear its speaker',
  prefs: 'you changed whom you follow or do not hear',
  feedback: 'you gave feedback',
  stopped_listening: 'you stopped listening',
  resumed: 'you resumed after a long pause',
};

function reasonInWords(reason) {
  if (typeof reason !== 'string') return JSON.stringify(reason);
  return REASONS[reason] || reason.replaceAll('_', ' ');
}

function formatLag(ms) {
  const s = (ms || 0) / 1000;
  return `${s < 10 ? s.toFixed(1) : Math.round(s)} s behind`;
}

function render() {
  const config = auth.config;
  const signedIn = !!auth.token;
  const inRoom = !!(room.sig && room.peer);

  // sign-in / account
  show('signin', !!config && !signedIn);
  if (config) {
    $('auth-mode').textContent = `(${config.mode})`;
    show('dev-form', config.mode === 'dev');
    show('firebase-form', config.mode === 'firebase' || config.mode === 'firebase-emulator');
  }
  show('account', signedIn);
  if (signedIn) {
    $('whoami').textContent = auth.email ? `${auth.email} (${auth.uid})` : auth.uid;
    const roles = inRoom ? room.roles : auth.roles;
    $('roles').textContent = roles.length ? roles.join(', ') : '';
    $('token-expiry').textContent = `· token until ${new Date(auth.expiresAt).toLocaleTimeString()}`;
  }

  // room
  const reconnecting = !!reconnect.want;
  show('room-card', signedIn);
  show('join', !inRoom && !reconnecting);
  show('leave', inRoom || reconnecting);
  $('room').disabled = inRoom || reconnecting;
  show('reconnecting', reconnecting);
  if (reconnecting) {
    $('reconnecting').textContent = reconnect.last
      ? `Connection lost (${reconnect.last}): reconnecting to ${reconnect.want.name}, attempt ${reconnect.attempt}…`
      : `Joining ${reconnect.want.name} again…`;
  }
  show('room-info', inRoom);
  $('room-name').textContent = room.name || '';
  $('my-peer').textContent = room.peer || '';
  $('room-link').href = room.name ? `${location.origin}${location.pathname}?room=${encodeURIComponent(room.name)}` : '';
  show('dominant', inRoom && !!room.dominant);
  $('dominant-speaker').textContent = room.dominant || '';
  renderPeers(inRoom);

  // talk
  show('talk-card', inRoom);
  const publishing = !!room.send;
  $('talk').hidden = publishing;
  $('talk').disabled = !mayPublish();
  $('camera').disabled = publishing || !mayPublish();
  show('talk-hint', !mayPublish());
  $('check-mic').hidden = publishing;
  $('check-mic').textContent = meter.stream && !publishing ? 'Stop checking' : 'Check microphone';
  const handRaised = room.hands.includes(room.peer);
  show('raise-hand', inRoom && !mayPublish());
  $('raise-hand').textContent = handRaised ? 'Lower hand' : 'Raise hand';
  $('raise-hand').setAttribute('aria-pressed', String(handRaised));
  show('invitation', inRoom && !!room.invitedBy);
  show('stage-note', inRoom && !!room.stageNote);
  const heard = room.audience;
  show('audience', inRoom && publishing && !!heard);
  $('audience').textContent = heard ? `heard now by ${heard.live} live, ${heard.behind} behind` : '';
  $('stage-note').textContent = room.stageNote || '';
  $('invited-by').textContent = room.invitedBy || '';
  show('stop-talk', publishing);
  show('mute-mic', publishing);
  $('mute-mic').textContent = room.micPaused ? 'Unmute' : 'Mute';
  $('mute-mic').setAttribute('aria-pressed', String(room.micPaused));
  // A moderator's mute: the button cannot lift it, and says why.
  $('mute-mic').disabled = !!room.mutedBy;
  show('mic-held', inRoom && !!room.mutedBy);
  $('mic-held').textContent = room.mutedBy ? `${room.mutedBy} (a moderator) muted your microphone: only a moderator can unmute it.` : '';

  // listen
  show('listen-card', inRoom);
  const listening = !!room.recv;
  $('listen').hidden = listening;
  $('want-video').disabled = listening;
  show('stop-listen', listening);
  show('pause-listen', listening);
  $('pause-listen').textContent = room.recvPaused ? 'Resume' : 'Pause';
  $('pause-listen').setAttribute('aria-pressed', String(room.recvPaused));
  renderNowPlaying(listening);
  renderUpNext();

  show('utterances-card', inRoom);
  renderUtterances();
  if (inRoom) saveRoom();
}

function renderNowPlaying(listening) {
  const np = room.nowPlaying;
  const el = $('now-playing');
  const utterance = np && np.utterance ? np.utterance : null;
  const isLive = !!(utterance && np.live && (np.lag_ms || 0) < 1000);
  const when = isLive ? 'live' : utterance && np.lag_ms ? formatLag(np.lag_ms) : 'ended';
  // In plain words ("alice, live", "carol, 3.0 s behind"); the utterance id stays in the data.
  const who = utterance ? np.speaker || utterance.split('#')[0] : null;
  el.textContent = utterance ? `${who}, ${when}` : listening ? 'nothing: waiting for someone to talk' : 'not listening';
  el.dataset.utterance = utterance || '';
  el.classList.toggle('idle', !utterance);
  $('now-speaker').textContent = utterance ? `(${utterance})` : '';
  const live = $('now-live');
  if (utterance) {
    live.textContent = when;
    live.dataset.live = String(isLive);
    live.hidden = false;
  } else {
    live.textContent = '';
    live.hidden = true;
  }
  $('now-reason').textContent = np && np.reason ? `why: ${reasonInWords(np.reason)}` : '';
  $('skip').disabled = !utterance;
  const liked = !!(utterance && room.utterances.get(utterance) && room.utterances.get(utterance).liked);
  $('like').disabled = !utterance;
  $('like').textContent = liked ? 'Liked' : 'Like';
  $('like').setAttribute('aria-pressed', String(liked));
}

// Why an utterance waits in the queue, in words.
const UP_NEXT_WHY = {
  switch: 'next, at a pause in this one',
  resume_cut: 'then back to where this one interrupted it',
  recommended: 'recommended for you',
};

// The queue of what plays next: "bob, live", "carol, started 4 s ago".
function renderUpNext() {
  const list = $('up-next');
  const listening = !!room.recv;
  const queue = listening ? room.upNext : [];
  $('up-next-box').hidden = queue.length === 0;
  list.replaceChildren(
    ...queue.map((item) => {
      const li = document.createElement('li');
      li.dataset.utterance = item.utterance;
      li.dataset.reason = item.reason;
      const ago = Math.round(((item.age_ms || 0) + Date.now() - room.upNextAt) / 1000);
      li.append(`${item.speaker}, ${item.live ? 'live' : `started ${ago} s ago`} `);
      const why = document.createElement('small');
      why.textContent = `(${UP_NEXT_WHY[item.reason] || reasonInWords(item.reason)})`;
      li.append(why);
      return li;
    }),
  );
}

// The publishers' meters move with every levels notice, without redrawing the peer list.
function renderLevels() {
  for (const meter of document.querySelectorAll('meter[data-level-peer]')) {
    meter.value = room.levels[meter.dataset.levelPeer] || 0;
  }
}

// A peer is speaking while one of its utterances is open (utterance_started until _ended).
function speaking(peer) {
  for (const u of room.utterances.values()) if (u.live && u.speaker === peer) return true;
  return false;
}

function renderPeers(inRoom) {
  const list = $('peers');
  list.replaceChildren();
  if (!inRoom) return;
  const peers = [...room.peers.values()].sort((a, b) => a.peer.localeCompare(b.peer));
  const me = { peer: room.peer, uid: auth.uid, roles: room.roles, publishing: !!room.send, me: true };
  for (const p of [me, ...peers.filter((p) => p.peer !== room.peer)]) {
    const following = room.follow.has(p.peer);
    const muted = room.mute.has(p.peer);
    const li = h('li', { dataset: { peer: p.peer }, 'data-testid': `peer-${p.peer}` },
      h('span', { class: 'peer-name' }, p.peer, p.me ? ' (you)' : ''),
      h('span', { class: 'roles' }, (p.roles || []).join(', ')),
      p.publishing ? h('span', { class: 'badge talking', 'data-testid': `publishing-${p.peer}` }, 'publishing') : null,
      speaking(p.peer) ? h('span', { class: 'badge speaking', 'data-testid': `speaking-${p.peer}` }, 'speaking') : null,
      p.publishing ? h('meter', { class: 'peer-level', min: '0', max: '127', value: String(room.levels[p.peer] || 0), 'data-testid': `level-${p.peer}`, dataset: { levelPeer: p.peer }, title: 'level' }) : null,
      room.hands.includes(p.peer) ? h('span', { class: 'badge hand', 'data-testid': `hand-${p.peer}` }, `hand raised (#${room.hands.indexOf(p.peer) + 1})`) : null,
      heldBy(p) ? h('span', { class: 'badge held', 'data-testid': `held-${p.peer}` }, `mic muted by ${heldBy(p)}`) : null,
    );
    const speaks = (p.roles || []).some((r) => r === 'speaker' || r === 'admin');
    if (!p.me) {
      li.append(
        h('button', {
          type: 'button', class: 'toggle', 'aria-pressed': String(following),
          'data-testid': `follow-${p.peer}`, dataset: { action: 'follow', peer: p.peer },
        }, following ? 'Following' : 'Follow'),
        h('button', {
          type: 'button', class: 'toggle', 'aria-pressed': String(muted),
          'data-testid': `mute-${p.peer}`, dataset: { action: 'mute', peer: p.peer },
        }, muted ? 'Not played to you' : "Don't play to me"),
      );
      if (mayModerate()) {
        li.append(
          heldBy(p)
            ? h('button', { type: 'button', class: 'mod', 'data-testid': `unmute-peer-${p.peer}`, dataset: { action: 'unmute_peer', peer: p.peer } }, 'Lift mic mute')
            : h('button', { type: 'button', class: 'mod', 'data-testid': `mute-peer-${p.peer}`, dataset: { action: 'mute_peer', peer: p.peer } }, 'Silence mic'),
          h('button', { type: 'button', class: 'mod', 'data-testid': `remove-peer-${p.peer}`, dataset: { action: 'remove_peer', peer: p.peer } }, 'Remove'),
          speaks
            ? ((p.roles || []).includes('admin') ? null : h('button', { type: 'button', class: 'mod', 'data-testid': `move-to-audience-${p.peer}`, dataset: { action: 'move_to_audience', peer: p.peer } }, 'Move to audience'))
            : h('button', { type: 'button', class: 'mod', 'data-testid': `invite-${p.peer}`, dataset: { action: 'invite_to_speak', peer: p.peer } }, 'Invite to speak'),
        );
      }
    }
    list.append(li);
  }
}

// The moderator whose mute holds a peer of the list (ourselves included).
function heldBy(p) {
  return p.me ? room.mutedBy : p.muted_by || null;
}

// What became of an utterance for this listener: heard, skipped, cut, or missed (it ended and
// was never played to us while we listened).
function utteranceMark(u) {
  if (u.mark) return u.mark;
  if (!u.played && !u.live && u.duration_ms !== undefined && room.recv && u.speaker !== room.peer) return 'missed';
  return null;
}

function renderUtterances() {
  const list = $('utterances');
  list.replaceChildren();
  const items = [...room.utterances.values()].sort((a, b) => b.order - a.order);
  if (!items.length) {
    list.append(h('li', { class: 'empty' }, 'none yet'));
    return;
  }
  const playing = room.nowPlaying && room.nowPlaying.utterance;
  for (const u of items) {
    const state = u.live ? 'live' : u.duration_ms !== undefined ? `${(u.duration_ms / 1000).toFixed(1)} s` : '';
    list.append(h('li', {
      class: u.utterance === playing ? 'playing' : '',
      dataset: { utterance: u.utterance, live: String(u.live) },
      'data-testid': `utterance-${u.utterance}`,
    },
    h('span', { class: 'utt-id' }, u.utterance),
    h('span', { class: 'utt-state' }, state),
    u.utterance === playing ? h('span', { class: 'badge' }, 'playing') : null,
    u.utterance !== playing && utteranceMark(u) ? h('span', { class: `badge mark-${utteranceMark(u)}`, 'data-testid': `mark-${u.utterance}` }, utteranceMark(u)) : null,
    u.liked ? h('span', { class: 'badge liked', 'data-testid': `liked-${u.utterance}` }, 'liked') : null,
    u.speaker !== room.peer && room.recv
      ? h('button', { type: 'button', class: 'small', dataset: { action: 'like-utterance', utterance: u.utterance } }, 'Like')
      : null));
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring

function wire() {
  $('error-dismiss').addEventListener('click', clearError);

  $('dev-form').addEventListener('submit', action($('dev-signin'), 'sign-in', async () => {
    const name = $('dev-name').value.trim();
    const role = $('dev-role').value;
    await signInDev(name, role);
    await whoami();
    try {
      localStorage.setItem('encore.dev', JSON.stringify({ name, role }));
    } catch {
      // private mode
    }
    setStatus('signed-in', `signed in as ${auth.uid}`);
  }));

  const firebaseSubmit = (signUp) => action(signUp ? $('signup-password') : $('signin-password'), signUp ? 'sign-up' : 'sign-in', async () => {
    const form = $('firebase-form');
    if (!form.reportValidity()) return;
    await signInFirebase($('email').value.trim(), $('password').value, signUp);
    $('password').value = '';
    await whoami();
    setStatus('signed-in', `signed in as ${auth.email || auth.uid}`);
  });
  $('firebase-form').addEventListener('submit', firebaseSubmit(false));
  $('signup-password').addEventListener('click', firebaseSubmit(true));

  $('signout').addEventListener('click', action(null, 'sign-out', async () => signOut()));

  $('join-form').addEventListener('submit', action($('join'), 'join', async () => {
    await joinRoom($('room').value.trim());
  }));
  $('leave').addEventListener('click', action($('leave'), 'leave', async () => leaveRoom('leave')));

  $('talk').addEventListener('click', action($('talk'), 'talk', async () => startTalking($('camera').checked)));
  $('check-mic').addEventListener('click', action($('check-mic'), 'check the microphone', checkMicrophone));
  $('raise-hand').addEventListener('click', action($('raise-hand'), 'raise hand', async () => {
    await room.sig.request(room.hands.includes(room.peer) ? 'lower_hand' : 'raise_hand', {});
  }));
  const answerInvite = (accept) => async () => {
    room.invitedBy = null;
    await room.sig.request('answer_invite', { accept });
  };
  $('accept-invite').addEventListener('click', action($('accept-invite'), 'accept the invitation', answerInvite(true)));
  $('decline-invite').addEventListener('click', action($('decline-invite'), 'decline the invitation', answerInvite(false)));
  $('stop-talk').addEventListener('click', action($('stop-talk'), 'stop talking', stopTalking));
  $('mute-mic').addEventListener('click', action($('mute-mic'), 'microphone', toggleMic));

  $('listen').addEventListener('click', action($('listen'), 'listen', async () => startListening($('want-video').checked)));
  $('stop-listen').addEventListener('click', action($('stop-listen'), 'stop listening', stopListening));
  $('pause-listen').addEventListener('click', action($('pause-listen'), 'pause', toggleListening));

  $('skip').addEventListener('click', action($('skip'), 'skip', async () => feedback('skip', room.nowPlaying && room.nowPlaying.utterance)));
  $('like').addEventListener('click', action($('like'), 'like', async () => feedback('like', room.nowPlaying && room.nowPlaying.utterance)));

  // Delegated: per-peer and per-utterance buttons are re-rendered often.
  $('peers').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action]');
    if (!button) return;
    const { action: what, peer } = button.dataset;
    const run = {
      follow: () => togglePref(room.follow, peer),
      mute: () => togglePref(room.mute, peer),
      mute_peer: () => room.sig.request('mute_peer', { peer }),
      unmute_peer: () => room.sig.request('unmute_peer', { peer }),
      remove_peer: () => room.sig.request('remove_peer', { peer }),
      invite_to_speak: () => room.sig.request('invite_to_speak', { peer }),
      move_to_audience: () => room.sig.request('move_to_audience', { peer }),
    }[what];
    if (run) action(button, what.replaceAll('_', ' '), run)();
  });
  $('utterances').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action="like-utterance"]');
    if (button) action(button, 'like', () => feedback('like', button.dataset.utterance))();
  });

  window.addEventListener('pagehide', () => {
    if (room.sig) room.sig.close(1001, 'page closed');
  });
}

async function main() {
  wire();
  try {
    const saved = JSON.parse(localStorage.getItem('encore.dev') || 'null');
    if (saved) {
      $('dev-name').value = saved.name || '';
      if (saved.role) $('dev-role').value = saved.role;
    }
  } catch {
    // no storage
  }
  try {
    auth.config = await fetchJson('/api/client-config');
  } catch (error) {
    setStatus('error', 'the server is unreachable');
    showError(error, 'loading the sign-in settings');
    return;
  }
  if (auth.config.mode === 'firebase-emulator') {
    $('firebase-hint').textContent = `Firebase Auth Emulator at ${auth.config.emulatorHost || '127.0.0.1:9099'} (project ${auth.config.projectId}): test accounts only.`;
  } else if (auth.config.mode === 'firebase') {
    $('firebase-hint').textContent = `Firebase project ${auth.config.projectId}.`;
  }
  // A shared link (`/?room=NAME`) names the room to join.
  const linked = new URLSearchParams(location.search).get('room');
  if (linked && NAME_PATTERN.test(linked)) $('room').value = linked;
  setStatus('signed-out', 'signed out');
  // A reload: signed in again from what was kept, and back in this tab's room as before.
  try {
    if (await restoreSession()) {
      const want = savedRoom();
      if (want) scheduleReconnect(want, '');
    }
  } catch (error) {
    showError(error, 'signing in again');
  }
  render();
}

// For tests and the console: read-only views of the state, and the receive stats.
window.encore = {
  auth: () => ({ uid: auth.uid, mode: auth.config && auth.config.mode, expiresAt: auth.expiresAt, roles: auth.roles }),
  room: () => ({
    name: room.name,
    peer: room.peer,
    roles: room.roles,
    peers: [...room.peers.values()],
    nowPlaying: room.nowPlaying,
    utterances: [...room.utterances.values()],
    publishing: !!room.send,
    listening: !!room.recv,
  }),
  get sendPc() {
    return room.send ? room.send.pc : null;
  },
  get recvPc() {
    return room.recv ? room.recv.pc : null;
  },
  recvStats,
  // Reconnects that succeeded since the page loaded (the browser test checks them).
  reconnects: () => reconnect.done,
  // Refresh the ID token now (and send `reauth` on a live session), as the timer would.
  refresh: () => refreshToken().then(() => ({ expiresAt: auth.expiresAt })),
};

main();
