// Type declarations for sealpost-client (hand-written; they describe src/*.js).

/** Codes the server sends (protocol.md, "Errors"). */
export type WireErrorCode =
  /** 400/405/415/422: unparsable request, or a field fails validation (`field` names it). */
  | 'invalid'
  /** 401: missing, expired or revoked credentials, a failed login, or a refresh that failed (the session is over). */
  | 'unauthorized'
  /** 404: no such user, device, message or route. */
  | 'not_found'
  /** 409: username taken, removing the only device, or a send's `client_id` already used for a different send. */
  | 'conflict'
  /** 409: the account holds as many devices as it may. */
  | 'too_many_devices'
  /** 409: a send's envelopes do not match the recipient's devices (`missing`, `extra`). `send` recovers by itself, up to 3 times. */
  | 'devices_changed'
  /** 413: the request or a decoded body is over its limit. */
  | 'too_large'
  /** 403: refused by policy (wrong current password, disabled account, disallowed origin). */
  | 'forbidden'
  /** 429: over a rate limit; wait `retryAfter` seconds. */
  | 'rate_limited'
  /** 429: a recipient device's queue is full; nothing was stored. */
  | 'queue_full'
  /** 429: the WebSocket upgrade was refused (too many sockets). */
  | 'too_many_connections'
  /** 503: database unreachable, shutting down, or a message cannot be read now. Retryable. */
  | 'unavailable'
  /** 500: a server bug. Retryable. */
  | 'internal'
  /** 422 (a push target's `kind`) or 404 (the VAPID key): the server has no provider of that kind. */
  | 'push_unavailable';

/** Codes the library raises itself, with no server reply. */
export type ClientErrorCode =
  /** The request or socket failed before a reply. Retryable. */
  | 'network'
  /** No reply in time (the request may have taken effect). Retryable. */
  | 'timeout'
  /** The client was closed by the application. */
  | 'closed'
  /** The operation needs the live socket (ephemeral sends). */
  | 'not_connected'
  /** The server answered something this library cannot read. */
  | 'protocol';

export type ErrorCode = WireErrorCode | ClientErrorCode;

export const WIRE_CODES: readonly WireErrorCode[];
export const CLIENT_CODES: readonly ClientErrorCode[];

/** One account of a multi-recipient send's `devices_changed`. */
export interface DevicesChangedRecipient { to: string; missing: number[]; extra: number[] }

/** The one error type: every failure of the library is one, with a stable `code`. */
export class SealpostError extends Error {
  constructor(code: ErrorCode, message: string, detail?: {
    status?: number; field?: string; missing?: number[]; extra?: number[];
    recipients?: DevicesChangedRecipient[]; unknown?: string[];
    retryAfter?: number; requestId?: string; cause?: unknown;
  });
  readonly name: 'SealpostError';
  readonly code: ErrorCode;
  /** HTTP status of a REST reply; undefined for socket `error` frames and client codes. */
  readonly status?: number;
  /** The request field at fault (`invalid`), e.g. `username`, `to`, `user_id`, `text`. */
  readonly field?: string;
  /** `devices_changed`: the recipient's device ids the send had no envelope for. */
  readonly missing?: number[];
  /** `devices_changed`: device ids it had an envelope for that the recipient does not have. */
  readonly extra?: number[];
  /** `devices_changed` of a multi-recipient send (`sendGroup`): one entry per account whose devices differ. */
  readonly recipients?: DevicesChangedRecipient[];
  /** `not_found` of a multi-recipient send: the recipient ids that are not accounts. */
  readonly unknown?: string[];
  /** Seconds to wait before trying again (`rate_limited`, a 503 that says): the `Retry-After` header, or the socket frame's `retry_after_ms` / 1000. */
  readonly retryAfter?: number;
  /** The server's `X-Request-Id` of a REST reply. */
  readonly requestId?: string;
  /** Whether the same request may succeed if sent again (`network`, `timeout`, `unavailable`, `internal`). */
  readonly retryable: boolean;
}

// ---- keys and the body format -------------------------------------------------

/** A device's crypto_box (X25519) key pair. */
export interface DeviceKeys { publicKey: Uint8Array; secretKey: Uint8Array }
/** The same, as standard base64 strings: what an application persists. */
export interface ExportedDeviceKeys { publicKey: string; secretKey: string }

/** What `importDeviceKeys` and the `keys` options take: a pair, or a secret key alone (`secret_key` is the Rust client's stored form). */
export type ImportableKeys =
  | ExportedDeviceKeys
  | DeviceKeys
  | { secretKey: string | Uint8Array; publicKey?: string | Uint8Array }
  | { secret_key: string };

/** libsodium-wrappers (or a compatible object); typed loosely to take any build. */
export type Sodium = any;

/** Imports libsodium-wrappers, or readies and returns the one given. */
export function loadSodium(injected?: Sodium): Promise<Sodium>;
export function generateDeviceKeys(sodium: Sodium): DeviceKeys;
export function exportDeviceKeys(sodium: Sodium, keys: DeviceKeys): ExportedDeviceKeys;
/** Checks sizes and that the public key (if given) is the secret key's; derives it otherwise. */
export function importDeviceKeys(sodium: Sodium, keys: ImportableKeys): DeviceKeys;

export const BODY_VERSION: 0x01;
/** A group message's shared body: `0x02 | nonce(24) | crypto_secretbox_easy(plaintext, nonce, K)`. */
export const SHARED_BODY_VERSION: 0x02;
/** 32: a group message's content key `K`. */
export const CONTENT_KEY_BYTES: number;
/** 64: what a device's group `key` opens to, `K || SHA-256(shared body)`. */
export const KEY_MATERIAL_BYTES: number;
/** 64 characters: the longest group name. */
export const MAX_GROUP_NAME_CHARS: number;

/** A group (protocol.md, "Group messages"): its id (a UUID its creator drew), name, and member user ids, the sender's included. */
export interface Group { id: string; name: string; members: string[] }
/** 41: version + nonce + tag. */
export const MIN_BODY_BYTES: number;
/** 16,384 characters (code points). */
export const MAX_TEXT_CHARS: number;

/** The plaintext inside a body (protocol.md, "Client body format"). */
export interface Plaintext {
  type: string;
  id: string;
  ts: number;
  text?: string;
  to?: string;
  /** Group messages only. */
  group?: Group;
  [field: string]: unknown;
}

export class BodyError extends Error {
  readonly name: 'BodyError';
  /**
   * `version` (not 0x01, or a shared body not 0x02), `short` (under 41 bytes), `open` (wrong key, altered,
   * unknown sender device), `plaintext` (not our JSON), `binding` (a group key that is not 64 bytes or was
   * sealed for another shared body: a body swapped under it).
   */
  readonly reason: 'version' | 'short' | 'open' | 'plaintext' | 'binding';
}

/** `0x01 | nonce(24) | crypto_box_easy(plaintext, nonce, recipientPublicKey, senderSecretKey)`. */
export function sealBody(sodium: Sodium, plaintext: Uint8Array, recipientPublicKey: Uint8Array, senderSecretKey: Uint8Array): Uint8Array;
/** @throws BodyError */
export function openBody(sodium: Sodium, body: Uint8Array, senderPublicKey: Uint8Array, recipientSecretKey: Uint8Array): Uint8Array;
/** Seals a group message once: a fresh `K` and nonce; `material` (K || SHA-256(shared)) is what `sealKey` seals per device. */
export function sealShared(sodium: Sodium, plaintext: Uint8Array): Promise<{ shared: Uint8Array; material: Uint8Array }>;
/** One device's `key`: `material` sealed as a 0x01 body (105 bytes). */
export function sealKey(sodium: Sodium, material: Uint8Array, recipientPublicKey: Uint8Array, senderSecretKey: Uint8Array): Uint8Array;
/** Opens the key, checks its hash against `shared`, opens `shared`. @throws BodyError */
export function openShared(sodium: Sodium, shared: Uint8Array, key: Uint8Array, senderPublicKey: Uint8Array, recipientSecretKey: Uint8Array): Promise<Uint8Array>;
/** SHA-256: libsodium's when it has one (sumo), else WebCrypto's. */
export function sha256(sodium: Sodium, bytes: Uint8Array): Promise<Uint8Array>;
export function encodePlaintext(plaintext: Plaintext): Uint8Array;
/** @throws BodyError (reason `plaintext`) */
export function decodePlaintext(bytes: Uint8Array): Plaintext;

// ---- backoff and bounds ------------------------------------------------------

/** Full-jitter exponential backoff: attempt n waits uniformly in [0, min(capMs, baseMs * 2^n)). */
export class Backoff {
  constructor(opts?: { baseMs?: number; capMs?: number; random?: () => number });
  baseMs: number;
  capMs: number;
  attempt: number;
  ceiling(): number;
  next(): number;
  reset(): void;
}
/** { baseMs: 250, capMs: 30000 } */
export const DEFAULT_BACKOFF: { readonly baseMs: number; readonly capMs: number };

/** Server message ids remembered for de-duplication (10,000). */
export const SEEN_IDS: number;
/** (sender, client id) pairs remembered for de-duplication (10,000). */
export const SEEN_CLIENT_IDS: number;
/** Decrypted messages an iterator may leave untaken before the client stops reading (1,000). */
export const MAX_BUFFERED: number;
/** Ids per ack batch (500, the server's cap). */
export const MAX_ACK_IDS: number;
/** Socket requests awaiting a reply at once (256, the server's cap). */
export const MAX_IN_FLIGHT: number;
/** Users whose device directories are cached (1,000). */
export const DIRECTORY_CAPACITY: number;
/** 3 */
export const DEVICES_CHANGED_RETRIES: number;
/** 4 */
export const TRANSIENT_RETRIES: number;
/** 3000 */
export const DEFAULT_POLL_INTERVAL_MS: number;
/** How long one `typing` shows its sender as typing: 5000 ms (protocol.md). */
export const TYPING_SHOWN_MS: number;

/** The server's limits (`GET /v1/limits`); a server without that endpoint has only the two defaults. */
export interface Limits {
  /** Largest decoded body (each envelope's), bytes: 65,536 by default. */
  max_body_bytes: number;
  max_devices_per_user: number;
  max_request_body_bytes?: number;
  max_ids_per_ack?: number;
  max_messages_per_page?: number;
  max_ref_bytes?: number;
  access_token_ttl_seconds?: number;
  message_ttl_seconds?: number;
  [limit: string]: number | undefined;
}
/** `{ max_body_bytes: 65536, max_devices_per_user: 10 }`: what a server without `GET /v1/limits` accepts. */
export const DEFAULT_LIMITS: Readonly<Limits>;
/** A sealed body's size before base64: 41 (version, nonce, tag) + the plaintext's bytes. */
export function sealedBodyBytes(plaintextBytes: number): number;

// ---- the client ----------------------------------------------------------------

export interface ClientOptions {
  /** The server, e.g. `https://relay.example.com` (ws/wss is derived from it). */
  baseUrl: string;
  /** A libsodium-wrappers instance (e.g. preloaded by a page); imported when absent. */
  sodium?: Sodium;
  /** Defaults to `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** A WebSocket constructor (in Node 20: the `ws` package); defaults to `globalThis.WebSocket`. */
  WebSocket?: any;
  /** Reconnect and resend backoff bounds; default base 250 ms, cap 30 s. */
  backoff?: { baseMs?: number; capMs?: number };
  /** Per REST request, default 30 s. */
  timeoutMs?: number;
  /**
   * For an app that runs several clients of one device's session (browser tabs, workers), each holding
   * the refresh token: without it, once one refreshes, another's token is spent, and its next refresh
   * (after the server's refresh grace) ends every session of the user. With it, every refresh runs in
   * `withLock`, presents the latest token `load` returns (when it differs from this client's), and
   * `save`s the new tokens before the lock is released. Without it, nothing changes.
   */
  tokenStore?: TokenStore;
}

/**
 * Where the clients of one device's session share its latest refresh token, and take turns to refresh it.
 * One store per device of an account: a client refuses a stored session of another device (`loggedOut`).
 * In a browser: `withLock: (fn) => navigator.locks.request('refresh:' + username, fn)` and localStorage.
 */
export interface TokenStore {
  /** Runs `fn` while no other client of the store runs one, and resolves with its result; across tabs, a Web Lock. */
  withLock<T>(fn: () => Promise<T>): Promise<T>;
  /** The latest refresh token stored (null or undefined when there is none: the client's own is used). Called in the lock. */
  load(): string | null | undefined | Promise<string | null | undefined>;
  /**
   * Stores new tokens (keep `refreshToken`; the access token may be kept too): after every refresh and
   * resume, and when a session starts (register, login, addDevice). Called in the lock. A failure is
   * reported on `error`; the client keeps its session.
   */
  save(tokens: Tokens): void | Promise<void>;
}

export interface Credentials { username: string; password: string }

export interface Tokens {
  accessToken: string;
  /** Single-use: persist the latest one only (the `tokens` event gives each new one). */
  refreshToken: string;
  /** Epoch milliseconds. */
  expiresAt: number;
  deviceId: number;
  /** The account's user id. */
  userId?: string;
}

/** What `sendGroup` resolves with. */
export interface GroupSendResult {
  /** The one server id of every copy. */
  id: string;
  sentAt: string;
  clientId: string;
  /** The group as sent (you among its members). */
  group: Group;
  /** The accounts the send went to, in order (yours last when you have another device). */
  recipients: string[];
  /** The shared body as it crossed the server (base64): all it held of the text, with a sealed key per device. */
  shared: string;
}

/** A decrypted text message. */
export interface Message {
  /** The server's message id (UUIDv7); what `ack` takes. */
  id: string;
  /** The sender's user id (your own for a sync copy). */
  from: string;
  fromDevice: number;
  /** The sender's client message id, the same on every copy and retry. */
  clientId: string;
  /** Sender's clock, epoch ms. */
  ts: number;
  text: string;
  /** Sync copies only: the peer of the conversation. */
  to?: string;
  /** A group message: the group to file it under (create the conversation when new; the latest message's name and members are the group's). */
  group?: Group;
  /** Server acceptance time, RFC 3339. */
  sentAt: string;
  /** This device's sealed body as it arrived (base64): all the server ever held of it. */
  body: string;
  /** Acknowledges this copy (batched with others). */
  ack(): Promise<void>;
}

export interface Undecryptable {
  id: string;
  from: string;
  fromDevice: number;
  sentAt: string;
  reason: BodyError['reason'];
  error: BodyError;
  /** Set for an ephemeral message (not acked: nothing to ack). */
  ephemeral?: true;
}

export interface EphemeralMessage {
  id: string;
  from: string;
  fromDevice: number;
  sentAt: string;
  /** The decrypted plaintext, e.g. `{type: "typing", id, ts}`. */
  payload: Plaintext;
}

export interface Receipt {
  /** Your message's server id. */
  id: string;
  /** The recipient's user id. */
  to: string;
  /** The recipient device that acknowledged it. */
  deviceId: number;
}

export interface OwnDevice {
  device_id: number;
  name: string | null;
  public_key: string;
  updated_at: string;
  created_at: string;
  last_seen_at: string;
  current: boolean;
  /** The device's push target (kind and since when, never the endpoint or token); null when it has none or its push service dropped it; absent from a server older than push targets. */
  push?: { kind: PushKind; updated_at: string } | null;
}

export type PushKind = 'webpush' | 'apns' | 'fcm' | (string & {});

/** A browser's `PushSubscription.toJSON()` (a `webpush` target). */
export interface WebPushSubscriptionJSON {
  endpoint: string;
  keys: { p256dh: string; auth: string };
  expirationTime?: number | null;
}

/** Where the server wakes a device: a Web Push subscription (a browser's PushSubscription, or its JSON), or a target with its `kind`. */
export type PushTarget =
  | { toJSON(): WebPushSubscriptionJSON }
  | WebPushSubscriptionJSON
  | ({ kind: 'webpush' } & WebPushSubscriptionJSON)
  | { kind: 'apns'; token: string; topic: string; environment?: 'production' | 'sandbox' }
  | { kind: 'fcm'; token: string };

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'drained' | 'reconnecting' | 'paused' | 'closed';

export interface StateEvent {
  state: ConnectionState;
  /** The close code that led here (`reconnecting`, `closed`, `paused`). 4409/4429 are final. */
  code?: number;
  reason?: string;
  /** `reconnecting`: the wait before the next attempt. */
  delayMs?: number;
  attempt?: number;
  userId?: string;
  deviceId?: number;
}

export interface SendResult {
  /** The server id of the message to the recipient (null for a note to yourself with no other device). */
  id: string | null;
  sentAt: string | null;
  /** The client message id in the plaintext (`Message.clientId` at the receivers); not the sends' `client_id` keys, which the library draws per send. */
  clientId: string;
  /** The sealed envelopes sent, one per recipient device (base64): what the server holds. */
  envelopes: { deviceId: number; body: string }[];
  /** The sync copy to your other devices; null when there are none. */
  sync: { id: string; sentAt: string } | null;
  /** Set when the message was accepted but its sync copy failed. */
  syncError?: SealpostError;
}

export interface DirectoryEntry {
  userId: string;
  /** The account's username as registered (absent from a server older than that field). */
  username?: string;
  devices: { deviceId: number; publicKey: Uint8Array }[];
  fetchedAt: number;
}

/** Why a device of your account changed: added, removed, its key changed, or a new password login of it. */
export type DeviceChangeReason = 'added' | 'removed' | 'key' | 'login' | (string & {});

export interface SendOptions {
  /** A client message id to reuse: an app-level resend, encrypted and stored anew, that receivers drop as a `duplicate`. */
  clientId?: string;
  /**
   * Resends after transient failures (dropped connection, timeout, 5xx, rate limit), each with the same
   * ciphertext under the same `client_id`; default TRANSIENT_RETRIES. `Infinity` waits out a server that is
   * down (a resend goes as soon as the socket is back).
   */
  retries?: number;
  /** Told before each wait: e.g. to show the message as pending. */
  onRetry?: (r: { error: SealpostError; attempt: number; delayMs: number }) => void;
  /**
   * `true` (the default): the recipient's offline devices are woken at once, at high priority. `false`: at low
   * priority, at most once per device in the server's quiet interval (what can wait until the app is opened).
   * The sync copy to your other devices is always non-urgent.
   */
  urgent?: boolean;
}

export interface TextMeasure {
  /** Characters (code points), against `maxChars` (16,384). */
  chars: number;
  maxChars: number;
  /** The largest sealed body of this text (the sync copy's), against the server's `maxBodyBytes`. */
  sealedBytes: number;
  maxBodyBytes: number;
  /** Whether `send` would take it. */
  fits: boolean;
}

export interface ClientEvents {
  /** A new decrypted message (also yielded by `messages()`). */
  message: (m: Message) => void;
  /** A body that cannot be read; it has been acked. */
  undecryptable: (u: Undecryptable) => void;
  /** A plaintext of a type this library does not know; acked and dropped. */
  ignored: (x: { id: string; from: string; fromDevice: number; type: string; plaintext: Plaintext }) => void;
  /** A second server message with an already shown (sender, client id); acked and dropped. */
  duplicate: (x: { id: string; clientId: string; from: string; firstId: string }) => void;
  ephemeral: (e: EphemeralMessage) => void;
  receipt: (r: Receipt) => void;
  /**
   * Your account's devices changed: a `devices_changed` frame, or a `ready` whose device ids differ from the
   * ones last known (a change while this device was offline). `deviceId` and `reason` name the device and
   * what happened to it, when the server says (a frame, from a server that sends them), or, on `ready`,
   * each device that came (`added`) or went (`removed`), one event each. `devices` is null if they could
   * not be fetched.
   */
  devicesChanged: (x: { deviceIds: number[]; deviceId?: number; reason?: DeviceChangeReason; devices: OwnDevice[] | null }) => void;
  /** Authenticated on a (new) connection; `devices`: the account's device ids (from a server that sends them); `pushDropped`: see the `pushDropped` event. */
  ready: (x: { userId: string; deviceId: number; expiresAt: string; devices?: number[]; pushDropped?: true }) => void;
  /** This device's push target was dropped by its push service (on each `ready` until it registers again): get a fresh subscription or token and `setPushTarget` it. */
  pushDropped: (x: { deviceId: number }) => void;
  /** `typing: true` when a user starts typing to you, `false` when they stop (5 s after the last `typing`, a `stopped`, or their text arrives). */
  typing: (x: { from: string; fromDevice?: number; typing: boolean }) => void;
  state: (s: StateEvent) => void;
  /** The current connection's backlog has been delivered. */
  drained: () => void;
  /** The socket's token was renewed in place. */
  authed: (x: { expiresAt: string }) => void;
  /** New tokens: persist `refreshToken` (with a `tokenStore`, `save` has; this then fires in its lock, after the save). */
  tokens: (t: Tokens) => void;
  /** The session ended (a refresh was refused): log in again. */
  loggedOut: (err: SealpostError) => void;
  /** Background failures (polling, renewals, sync copies, unmatched error frames, a `tokenStore.save` that threw). */
  error: (err: unknown) => void;
}

export class SealpostClient {
  /** Creates an account (device 1) and logs in. Keys are generated unless given. */
  static register(opts: ClientOptions & Credentials & { keys?: ImportableKeys }): Promise<SealpostClient>;
  /** Logs in as an existing device with its kept keys (checked against the server's key). */
  static login(opts: ClientOptions & Credentials & { deviceId?: number; keys: ImportableKeys }): Promise<SealpostClient>;
  /** Adds a device (`POST /v1/devices`) and logs in as it; persist `deviceId` and `exportKeys()`. */
  static addDevice(opts: ClientOptions & Credentials & { name?: string; keys?: ImportableKeys }): Promise<SealpostClient>;
  /**
   * Resumes from a persisted refresh token (spends it); with a `tokenStore`, from the latest one stored there.
   * Given `tokens` (all of `tokens()`, kept) whose access token has a minute or more left, starts on it and
   * spends nothing (a service worker woken by a push).
   */
  static resume(opts: ClientOptions & ({ refreshToken: string } | { tokenStore: TokenStore; refreshToken?: string } | { tokens: Tokens; tokenStore?: TokenStore }) & { keys: ImportableKeys }): Promise<SealpostClient>;

  private constructor();

  readonly userId: string;
  readonly username: string;
  readonly deviceId: number;
  readonly keys: DeviceKeys;
  readonly connectionState: ConnectionState;
  readonly sessionState: 'active' | 'loggedOut' | 'closed';
  /** Who is typing to you now (see the `typing` event). */
  readonly typing: { isTyping(userId: string): boolean };
  readonly directory: {
    get(userId: string): Promise<DirectoryEntry>;
    cached(userId: string): DirectoryEntry | undefined;
    refresh(userId: string): Promise<DirectoryEntry>;
    invalidate(userId: string): void;
  };

  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  once<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  off<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): void;

  exportKeys(): ExportedDeviceKeys;
  tokens(): Tokens;
  refreshTokens(): Promise<Tokens>;
  /** Any authenticated REST call (JSON), with the 401 refresh-and-retry. */
  request(method: string, path: string, body?: unknown): Promise<any>;

  /**
   * Opens the socket and keeps it open (reconnecting with backoff); resolves
   * on the first `ready`. Rejects (`closed`, or `unauthorized` once logged
   * out) only when the socket closes for good: 4409, 4429, or a refused refresh.
   */
  connect(opts?: { exclusive?: boolean }): Promise<void>;
  /** Resolves when the current connection's backlog is delivered. */
  waitForDrained(): Promise<void>;
  /** Closes the socket for good (no reconnect). */
  disconnect(): void;

  /** One round of `GET /v1/messages` pages; resolves with the number of copies received. */
  pollOnce(): Promise<number>;
  startPolling(opts?: { intervalMs?: number }): void;
  stopPolling(): void;

  /** Decrypted messages from the socket and polling, in arrival order. */
  messages(): AsyncIterableIterator<Message>;
  /** Acknowledges (batched); resolves when the batch is written, and durable where the server answers acks (`acked`). */
  ack(items: Message | string | Iterable<Message | string>): Promise<void>;
  flushAcks(): Promise<void>;

  /**
   * Encrypts for every device of `userId`, sends, then sends the sync copy to your other devices.
   * Each send is retried after transient failures with the same ciphertext under its own `client_id`,
   * so it is stored once. Refused before sealing: over 16,384 characters (`invalid`, field `text`), or a
   * sealed body over the server's `max_body_bytes` (`too_large`, field `text`).
   */
  send(userId: string, text: string, opts?: SendOptions): Promise<SendResult>;
  /** A new group (fresh id, you added to `members`); nothing is sent until its first `sendGroup`. */
  createGroup(name: string, members: string[]): Group;
  /**
   * A text to a group in the shared form: one multi-recipient send (`send_multi`, or `POST /v1/messages/multi`
   * without the socket) to every other member and, when you have other devices, to your own account. Retried
   * after transient failures byte for byte under one `client_id`; after `devices_changed`, only the keys of the
   * accounts named are sealed again. Refused before sealing as `send` is, and `invalid` (field `name`) for a
   * name over 64 characters.
   */
  sendGroup(group: Group, text: string, opts?: SendOptions): Promise<GroupSendResult>;
  /** Over the socket only; never stored. `delivered`: a connection of the recipient took it. */
  sendEphemeral(userId: string, payload?: { type: string; [field: string]: unknown }): Promise<{ id: string; delivered: boolean }>;
  /** The `typing` plaintext (or `state: "stopped"`), ephemeral. Send one every few seconds while typing. Needs the socket. */
  sendTyping(userId: string, opts?: { stopped?: boolean }): Promise<{ id: string; delivered: boolean }>;
  /** `GET /v1/limits`, asked once (DEFAULT_LIMITS from a server without it). */
  limits(): Promise<Limits>;
  /** `text` against the limits `send` checks (the server's as last learned: await `limits()` first). */
  measureText(text: string): TextMeasure;

  /** `GET /v1/devices` (names, times), refreshing your own directory. */
  devices(): Promise<OwnDevice[]>;
  /**
   * `PUT /v1/devices/{id}/push`: where the server wakes this device when a message waits and it holds no
   * socket (replaces its target; idempotent). Rejects `push_unavailable` (no provider of that kind) or
   * `invalid` with `field`.
   */
  setPushTarget(target: PushTarget): Promise<{ kind: PushKind; updatedAt: string }>;
  /** `DELETE /v1/devices/{id}/push`; resolves when there was none too. */
  deletePushTarget(): Promise<void>;
  /** `GET /v1/push/vapid`: the base64url `applicationServerKey`, or null when the server offers no Web Push. */
  vapidPublicKey(): Promise<string | null>;
  /** `POST /v1/logout`, then `close()`. */
  logout(): Promise<void>;
  /** Stops socket, polling and timers; writes pending acks first, best effort. */
  close(): Promise<void>;
}

/** The body of `PUT /v1/devices/{id}/push` for a target (a PushSubscription becomes `{kind: "webpush", ...}`). */
export function pushTargetBody(target: PushTarget): Record<string, unknown>;
