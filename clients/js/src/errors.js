// errors: the one error type of the library, `SealpostError`, and its
// construction from the server's two error shapes (a REST reply's
// `{"error": {...}}` and a WebSocket `error` frame). Every wire code of
// protocol.md is a `code`; the few failures that never reach the server
// (a dropped connection, a timeout, a closed client) have codes of their own,
// listed in CLIENT_CODES, so a caller switches on `code` alone.

/** Codes the server sends (protocol.md, "Errors"). */
export const WIRE_CODES = Object.freeze([
  'invalid',
  'unauthorized',
  'not_found',
  'conflict',
  'too_many_devices',
  'devices_changed',
  'too_large',
  'forbidden',
  'rate_limited',
  'queue_full',
  'too_many_connections',
  'unavailable',
  'internal',
  'push_unavailable',
]);

/** Codes the library raises itself, without a server reply. */
export const CLIENT_CODES = Object.freeze([
  'network', // the request or socket failed before a reply: retryable
  'timeout', // no reply in time: retryable (the request may have happened)
  'closed', // the client was closed by the application
  'not_connected', // the operation needs the live socket (ephemeral sends)
  'protocol', // the server answered something this library cannot read
]);

const RETRYABLE = new Set(['network', 'timeout', 'unavailable', 'internal']);

export class SealpostError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{status?: number, field?: string, missing?: number[], extra?: number[],
   *          recipients?: {to: string, missing: number[], extra: number[]}[], unknown?: string[],
   *          retryAfter?: number, requestId?: string, cause?: unknown}} [detail]
   */
  constructor(code, message, detail = {}) {
    super(message, detail.cause === undefined ? undefined : { cause: detail.cause });
    this.name = 'SealpostError';
    /** Stable code: one of WIRE_CODES or CLIENT_CODES. */
    this.code = code;
    /** HTTP status of a REST reply; undefined for socket frames and client codes. */
    this.status = detail.status;
    /** The request field at fault (`invalid`). */
    this.field = detail.field;
    /** `devices_changed`: recipient devices the send had no envelope for. */
    this.missing = detail.missing;
    /** `devices_changed`: envelopes for devices the recipient does not have. */
    this.extra = detail.extra;
    /** `devices_changed` of a multi-recipient send: one entry per account whose devices differ. */
    this.recipients = detail.recipients;
    /** `not_found` of a multi-recipient send: the ids that are not accounts. */
    this.unknown = detail.unknown;
    /** Seconds to wait before trying again (`rate_limited`, and 503s that say): from `Retry-After`, or the frame's `retry_after_ms`. */
    this.retryAfter = detail.retryAfter;
    /** The server's `X-Request-Id`, to quote when reporting a problem. */
    this.requestId = detail.requestId;
  }

  /** Whether sending the same request again may succeed without changing it. */
  get retryable() {
    return RETRYABLE.has(this.code);
  }
}

/**
 * Builds the error of a non-2xx REST reply.
 * @param {Response} response
 * @returns {Promise<SealpostError>}
 */
export async function errorFromResponse(response) {
  const requestId = response.headers.get('x-request-id') ?? undefined;
  // Integer seconds (what sealpost sends on every 429 and 503); an HTTP
  // date, which a proxy may send, is not read.
  const rawRetry = response.headers.get('retry-after');
  const retryHeader = rawRetry ? Number(rawRetry) : NaN;
  const retryAfter = Number.isFinite(retryHeader) && retryHeader >= 0 ? retryHeader : undefined;
  let body;
  try {
    body = await response.json();
  } catch {
    body = undefined;
  }
  const e = body && typeof body === 'object' ? body.error : undefined;
  if (!e || typeof e.code !== 'string') {
    // A proxy's page, or an empty reply: keep the status, guess the code.
    const code = response.status === 401 ? 'unauthorized' : response.status >= 500 ? 'unavailable' : 'protocol';
    return new SealpostError(code, `HTTP ${response.status} without a sealpost error body`, {
      status: response.status,
      retryAfter,
      requestId,
    });
  }
  return new SealpostError(e.code, String(e.message ?? e.code), {
    status: response.status,
    field: e.field,
    missing: e.missing,
    extra: e.extra,
    recipients: e.recipients,
    unknown: e.unknown,
    retryAfter,
    requestId,
  });
}

/**
 * Builds the error of a WebSocket `error` frame. The socket has no
 * `Retry-After`: a `rate_limited` (or `queue_full`, `too_many_connections`)
 * frame carries `retry_after_ms`, read into `retryAfter` (seconds). A
 * server older than that field says the wait only in its message
 * ("retry in 250 ms"), which is read instead.
 * @param {{code: string, message?: string, field?: string, missing?: number[], extra?: number[], recipients?: any[], unknown?: string[], retry_after_ms?: number}} frame
 */
export function errorFromFrame(frame) {
  let retryAfter;
  if (typeof frame.retry_after_ms === 'number' && frame.retry_after_ms >= 0) {
    retryAfter = frame.retry_after_ms / 1000;
  } else if (frame.code === 'rate_limited' && typeof frame.message === 'string') {
    const m = /(\d+)\s*ms/.exec(frame.message);
    if (m) retryAfter = Number(m[1]) / 1000;
  }
  return new SealpostError(frame.code, String(frame.message ?? frame.code), {
    field: frame.field,
    missing: frame.missing,
    extra: frame.extra,
    recipients: frame.recipients,
    unknown: frame.unknown,
    retryAfter,
  });
}
