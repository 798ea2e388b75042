package quiesce

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The protocol document, whose every example exchange is replayed against this agent.
const protocolDoc = "../../docs/PROTOCOL.md"

// Fields that vary from run to run: compared for presence only.
var volatile = map[string]bool{"duration_ms": true, "latency_ms": true, "pid": true}

type docBlock struct {
	line  int
	lines []docLine
}

type docLine struct {
	n    int
	text string
}

func docBlocks(t *testing.T) []docBlock {
	t.Helper()
	data, err := os.ReadFile(protocolDoc)
	if errors.Is(err, os.ErrNotExist) {
		if _, repo := os.Stat("../../protocol/Cargo.toml"); repo != nil {
			t.Skip("not inside the quiesce repository: no docs/PROTOCOL.md to replay")
		}
	}
	if err != nil {
		t.Fatalf("the protocol document: %v", err)
	}
	var blocks []docBlock
	var cur *docBlock
	for i, line := range strings.Split(string(data), "\n") {
		text := strings.TrimRight(line, " \t\r")
		switch {
		case cur == nil && text == "```exchange":
			cur = &docBlock{line: i + 1}
		case cur != nil && text == "```":
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			cur.lines = append(cur.lines, docLine{i + 1, strings.TrimRight(line, "\r")})
		}
	}
	if cur != nil {
		t.Fatal("unterminated exchange block")
	}
	return blocks
}

// expand turns `\xHH` into one byte and `[N×c]` into N copies of c.
func expand(request string) []byte {
	var out []byte
	for rest := request; rest != ""; {
		if strings.HasPrefix(rest, `\x`) && len(rest) >= 4 {
			b, err := strconv.ParseUint(rest[2:4], 16, 8)
			if err == nil {
				out = append(out, byte(b))
				rest = rest[4:]
				continue
			}
		}
		if strings.HasPrefix(rest, "[") {
			if end := strings.IndexByte(rest, ']'); end > 0 {
				if count, what, ok := strings.Cut(rest[1:end], "×"); ok {
					if n, err := strconv.Atoi(count); err == nil {
						out = append(out, strings.Repeat(what, n)...)
						rest = rest[end+1:]
						continue
					}
				}
			}
		}
		out = append(out, rest[0])
		rest = rest[1:]
	}
	return out
}

type docHandler struct {
	sub       SubStep
	component string
	state     string
	counts    map[string]uint64
	takes     time.Duration
}

// docAgent is the order service the document's examples run against: handlers for every
// sub-step but stop-poller, a cron job taking 300 ms, and the checks db, redis and mq. A name in
// failing fails with its message; a handler in hanging never returns until release is closed
// (it ignores its context, so the agent must cut it).
func docAgent(failing map[string]string, hanging map[string]bool, release <-chan struct{}) *Agent {
	var mu sync.Mutex
	components := map[string]map[string]any{
		"grpc":     {"state": "serving", "in_flight": 0},
		"cron":     {"state": "running"},
		"consumer": {"state": "consuming", "unacked": 0},
		"mq":       {"state": "open"},
		"redis":    {"state": "open"},
		"db":       {"state": "open", "pool_size": 10},
	}
	a := New("order-service")
	a.Service("order.v1.OrderService")
	for _, h := range []docHandler{
		{StopAccepting, "grpc", "draining", map[string]uint64{"listeners_closed": 1}, 0},
		{DrainInFlight, "grpc", "stopped", map[string]uint64{"requests_drained": 12, "requests_cancelled": 0}, 0},
		{StopCron, "cron", "stopped", map[string]uint64{"jobs_finished": 1}, 300 * time.Millisecond},
		{StopConsumer, "consumer", "stopped", map[string]uint64{"messages_acked": 3, "messages_requeued": 0}, 0},
		{CloseMQ, "mq", "closed", nil, 0},
		{CloseRedis, "redis", "closed", nil, 0},
		{CloseDB, "db", "closed", map[string]uint64{"connections_closed": 10}, 0},
	} {
		h := h
		failure, fails := failing[string(h.sub)]
		hangs := hanging[string(h.sub)]
		a.Handle(h.sub, func(ctx context.Context) (Report, error) {
			if hangs {
				<-release
				return Report{}, nil
			}
			if h.takes > 0 {
				t := time.NewTimer(h.takes)
				defer t.Stop()
				select {
				case <-t.C:
				case <-ctx.Done():
					return Report{}, ctx.Err()
				}
			}
			if fails {
				return Report{}, errors.New(failure)
			}
			mu.Lock()
			components[h.component]["state"] = h.state
			mu.Unlock()
			return Report{Counts: h.counts}, nil
		})
	}
	for _, name := range []string{"db", "redis", "mq"} {
		failure, fails := failing[name]
		a.Check(name, true, func(ctx context.Context) error {
			if fails {
				return errors.New(failure)
			}
			return nil
		})
	}
	a.Status(func() any {
		mu.Lock()
		defer mu.Unlock()
		b, _ := json.Marshal(components)
		return json.RawMessage(b)
	})
	return a
}

// glob matches text against a pattern in which "…" stands for any text.
func glob(pattern, text string) bool {
	parts := strings.Split(pattern, "…")
	if !strings.HasPrefix(text, parts[0]) {
		return false
	}
	rest := text[len(parts[0]):]
	for i, part := range parts[1:] {
		if i == len(parts)-2 {
			return strings.HasSuffix(rest, part)
		}
		at := strings.Index(rest, part)
		if at < 0 {
			return false
		}
		rest = rest[at+len(part):]
	}
	return rest == ""
}

func match(expected, actual any, path string) error {
	switch e := expected.(type) {
	case map[string]any:
		a, ok := actual.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: expected an object, got %v", path, actual)
		}
		if ek, ak := keys(e), keys(a); !reflect.DeepEqual(ek, ak) {
			return fmt.Errorf("%s: keys differ: %v vs %v", path, ek, ak)
		}
		for k, ev := range e {
			if volatile[k] {
				continue
			}
			if err := match(ev, a[k], path+"."+k); err != nil {
				return err
			}
		}
		return nil
	case []any:
		a, ok := actual.([]any)
		if !ok || len(a) != len(e) {
			return fmt.Errorf("%s: expected %v, got %v", path, expected, actual)
		}
		for i := range e {
			if err := match(e[i], a[i], fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		return nil
	case string:
		if a, ok := actual.(string); ok && strings.Contains(e, "…") && glob(e, a) {
			return nil
		}
	}
	if !reflect.DeepEqual(expected, actual) {
		return fmt.Errorf("%s: expected %v, got %v", path, expected, actual)
	}
	return nil
}

func keys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// runDocBlock replays one block and returns its differences; codes and verbs collect coverage.
func runDocBlock(t *testing.T, b docBlock, verbs, codes map[string]bool) []string {
	failing, hanging := map[string]string{}, map[string]bool{}
	needsPeer := false
	for _, l := range b.lines {
		if strings.HasPrefix(l.text, "# the app's ") {
			rest := strings.TrimPrefix(l.text, "# the app's ")
			if strings.HasSuffix(rest, " handler hangs") {
				hanging[strings.TrimSuffix(rest, " handler hangs")] = true
			}
			if name, message, ok := strings.Cut(rest, " fails: "); ok {
				name = strings.TrimSuffix(strings.TrimSuffix(name, " handler"), " check")
				failing[name] = message
			}
		}
		needsPeer = needsPeer || (strings.HasPrefix(l.text, "# connection") && strings.Contains(l.text, " as uid "))
	}
	if needsPeer {
		needRoot(t, fmt.Sprintf("the example at line %d connects as another uid", b.line))
	}
	release := make(chan struct{})
	defer close(release)
	a := docAgent(failing, hanging, release)
	srv, path := serve(t, a)
	defer srv.Shutdown()
	if needsPeer {
		openUp(t, path)
	}
	conns := map[int]*client{1: dial(t, path)}
	current := 1
	var peerLine string
	var errs []string
	for _, l := range b.lines {
		switch {
		case strings.HasPrefix(l.text, "# connection "):
			rest := strings.TrimPrefix(l.text, "# connection ")
			number, uid, asUID := strings.Cut(rest, " as uid ")
			current, _ = strconv.Atoi(strings.Fields(number)[0])
			if asUID {
				u, _ := strconv.Atoi(strings.Fields(uid)[0])
				peerLine = runPeer(t, path, uint32(u), uint32(u))
			} else if conns[current] == nil {
				conns[current] = dial(t, path)
			}
		case strings.HasPrefix(l.text, ">"):
			request := strings.TrimPrefix(strings.TrimPrefix(l.text, ">"), " ")
			if f := strings.Fields(request); len(f) > 0 {
				verbs[f[0]] = true
			}
			conns[current].send(string(expand(request)) + "\n")
		case strings.HasPrefix(l.text, "< "):
			doc := strings.TrimPrefix(l.text, "< ")
			var expected, actual any
			if err := json.Unmarshal([]byte(doc), &expected); err != nil {
				errs = append(errs, fmt.Sprintf("line %d: the documented reply is not JSON: %v", l.n, err))
				continue
			}
			line := peerLine
			peerLine = ""
			if line == "" {
				line = conns[current].line()
			}
			if err := json.Unmarshal([]byte(line), &actual); err != nil {
				errs = append(errs, fmt.Sprintf("line %d: the reply is not JSON: %q", l.n, line))
				continue
			}
			if m, ok := actual.(map[string]any); ok {
				if code, ok := m["error"].(string); ok {
					codes[code] = true
				}
			}
			if err := match(expected, actual, "$"); err != nil {
				errs = append(errs, fmt.Sprintf("line %d: %v\n  documented: %s\n  actual:     %s", l.n, err, doc, line))
			}
		}
	}
	return errs
}

func TestEveryExampleInProtocolDoc(t *testing.T) {
	hardTimeout(t, 60*time.Second)
	blocks := docBlocks(t)
	if len(blocks) < 10 {
		t.Fatalf("found only %d exchange blocks", len(blocks))
	}
	verbs, codes := map[string]bool{}, map[string]bool{}
	for _, b := range blocks {
		b := b
		t.Run(fmt.Sprintf("line%d", b.line), func(t *testing.T) {
			hardTimeout(t, 20*time.Second)
			for _, e := range runDocBlock(t, b, verbs, codes) {
				t.Error(e)
			}
		})
	}
	for _, v := range agentVerbs {
		if !verbs[v] {
			t.Errorf("no example sends %s", v)
		}
	}
	for _, c := range []string{CodeBadRequest, CodeUnknownVerb, CodeBadArgument, CodeMissingArgument,
		CodeLineTooLong, CodeInvalidUTF8, CodeUnsupportedVersion, CodeOutOfOrder, CodeNotDriver,
		CodeDriverTaken, CodePeerRefused} {
		if !codes[c] && os.Geteuid() == 0 {
			t.Errorf("no example is answered with %s", c)
		}
	}
}
