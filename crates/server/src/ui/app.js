// The raftwork status page: polls /v1/ui/overview about once a second and
// renders it with plain DOM calls (text only: nothing from the answer is
// parsed as HTML). Element ids and data-* attributes are stable: tests
// read them from the rendered DOM.
'use strict';

const POLL_MS = 1000;
let lastUpdate = null;

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  }
  for (const c of children) {
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function orDash(v) {
  return v === null || v === undefined ? '–' : v;
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
}

function ms(v) {
  return v === null || v === undefined ? '–' : v.toFixed(v < 10 ? 2 : 1) + ' ms';
}

function rate(v) {
  return v === null || v === undefined ? '–' : v.toFixed(1);
}

function setValue(id, value, text) {
  const e = $(id);
  e.dataset.value = value === null || value === undefined ? '' : String(value);
  e.textContent = text === undefined ? orDash(value) : text;
}

function showBanner(kind, text) {
  const b = $('banner');
  b.dataset.kind = kind || '';
  b.textContent = text || '';
  b.hidden = !kind;
}

function render(o) {
  const me = o.node;
  const names = {};
  for (const m of o.members) names[m.id] = m.name;
  const nameOf = (id) => (id === null || id === undefined ? null : names[id] || 'id ' + id);

  document.title = 'raftwork · ' + me.name + ' · ' + me.role;
  $('node-name').textContent = me.name + ' (' + me.role + ')';
  lastUpdate = new Date(o.unix_ms).toLocaleTimeString();
  $('updated').textContent = 'updated ' + lastUpdate;
  showBanner(o.banner && o.banner.kind, o.banner && o.banner.text);

  const leader = $('leader');
  leader.dataset.leader = o.leader ? o.leader.name || o.leader.id : '';
  leader.textContent = o.leader ? o.leader.name || 'id ' + o.leader.id : 'none';
  setValue('term', me.term);
  setValue('commit', me.commit);
  setValue('applied', me.applied);
  setValue('snapshot-index', me.snapshot_index);
  setValue('wal-size', me.wal ? me.wal.bytes : null, me.wal ? bytes(me.wal.bytes) : '–');
  $('wal-segments').textContent = me.wal
    ? me.wal.segments + (me.wal.segments === 1 ? ' segment' : ' segments')
    : 'data dir not known';
  setValue('write-rate', o.cluster_write_rate_per_sec, rate(o.cluster_write_rate_per_sec));
  setValue('write-p99', me.writes.p99_ms, ms(me.writes.p99_ms));

  const rows = o.members.map((m) => {
    const v = m.view;
    const role = v ? v.role : 'unreachable';
    const tr = el('tr', {
      'data-member': m.name || m.id,
      'data-id': m.id,
      'data-role': role,
      'data-reachable': m.reachable,
      'data-lag': m.lag,
      class: (m.is_self ? 'self ' : '') + (m.reachable ? '' : 'down'),
    },
    el('td', {}, m.name || '?', m.is_self ? ' (this node)' : ''),
    el('td', { class: 'mono' }, m.id),
    el('td', {}, el('span', { class: 'role role-' + role }, role), m.voter ? '' : ' (learner)'),
    el('td', { class: 'num' }, v ? v.term : '–'),
    el('td', { class: 'reach' }, m.reachable ? 'yes' : 'no',
      m.error ? el('div', { class: 'error small' }, m.error) : ''),
    el('td', { class: 'num' }, orDash(m.match_index)),
    el('td', { class: 'num' + (m.lag > 0 ? ' behind' : '') }, orDash(m.lag)),
    el('td', { class: 'num' }, v ? v.commit : '–'),
    el('td', { class: 'num' }, v ? v.applied : '–'),
    el('td', { class: 'num' }, v ? v.snapshot_index : '–'),
    el('td', { class: 'num' }, v && v.wal ? bytes(v.wal.bytes) : '–'),
    el('td', { class: 'num' }, v ? rate(v.writes.rate_per_sec) : '–'),
    el('td', { class: 'num' }, v ? ms(v.writes.p99_ms) : '–'),
    el('td', { class: 'mono small' }, orDash(m.api_url)));
    return tr;
  });
  $('members').tBodies[0].replaceChildren(...rows);

  const events = me.events.slice().reverse().map((e) => {
    let text;
    switch (e.kind) {
      case 'leader':
        text = e.leader
          ? 'leader is now ' + nameOf(e.leader) + ' (term ' + e.term + ')'
          : 'no leader known (term ' + e.term + ')';
        break;
      case 'membership':
        text = 'membership changed: ' +
          (e.changes.length
            ? e.changes.map((c) => c.op + ' ' + nameOf(c.id)).join(', ')
            : 'left the joint configuration') +
          '; voters ' + e.voters.map(nameOf).join(', ') +
          (e.learners.length ? '; learners ' + e.learners.map(nameOf).join(', ') : '');
        break;
      case 'removed':
        text = 'this node was removed from the cluster';
        break;
      case 'started':
        text = 'this node\'s API started';
        break;
      case 'missed':
        text = e.missed + ' events missed';
        break;
      default:
        text = e.kind;
    }
    return el('li', {
      'data-event': e.kind,
      'data-leader': e.kind === 'leader' ? nameOf(e.leader) || '' : null,
      'data-term': e.term,
    },
    el('time', {}, new Date(e.unix_ms).toLocaleTimeString()), ' ', text);
  });
  $('events').replaceChildren(...events);
}

async function refresh() {
  try {
    const r = await fetch('/v1/ui/overview', { cache: 'no-store' });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || 'HTTP ' + r.status);
    render(body);
  } catch (e) {
    showBanner('unreachable', 'this node does not answer (' + e.message + '); retrying');
    $('updated').textContent = lastUpdate ? 'not updated since ' + lastUpdate : 'no answer yet';
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, POLL_MS);
}

loop();
