package quiesce

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// ProtocolVersion is the version of the control protocol this package speaks.
const ProtocolVersion = 1

// MaxLine is the longest request line accepted, in bytes, not counting its "\n".
const MaxLine = 4096

// maxName is the longest verb or key accepted, in bytes.
const maxName = 64

// maxWait caps a deadline or budget: longer ones are treated as ten years.
const maxWait = 10 * 365 * 24 * time.Hour

// Error codes of protocol v1 (the "error" field of a refusal). They are stable.
const (
	CodeBadRequest         = "bad_request"
	CodeUnknownVerb        = "unknown_verb"
	CodeBadArgument        = "bad_argument"
	CodeMissingArgument    = "missing_argument"
	CodeLineTooLong        = "line_too_long"
	CodeInvalidUTF8        = "invalid_utf8"
	CodeUnsupportedVersion = "unsupported_version"
	CodeOutOfOrder         = "out_of_order"
	CodeNotDriver          = "not_driver"
	CodeDriverTaken        = "driver_taken"
	CodePeerRefused        = "peer_refused"
	CodeInternal           = "internal"
)

// agentVerbs lists every verb the agent serves, for messages.
var agentVerbs = []string{
	"hello", "status", "health", "drain", "stop-cron", "stop-consumer", "stop-poller", "close",
}

// Refusal is a refused request: a stable code, a message naming the problem and the fix, and
// for out_of_order the verb expected first. A refused request changes nothing.
type Refusal struct {
	Code     string
	Message  string
	Expected Verb
}

func (r *Refusal) Error() string { return r.Code + ": " + r.Message }

func refuse(code, format string, args ...any) *Refusal {
	return &Refusal{Code: code, Message: fmt.Sprintf(format, args...)}
}

// request is a parsed request line: a verb and its key=value arguments, keys unique, in order.
type request struct {
	verb string
	keys []string
	vals []string
}

func (r *request) get(key string) (string, bool) {
	for i, k := range r.keys {
		if k == key {
			return r.vals[i], true
		}
	}
	return "", false
}

// isBlank reports whether a line is empty or only spaces, tabs and carriage returns. Blank
// lines get no reply.
func isBlank(line []byte) bool {
	for _, b := range line {
		if b != ' ' && b != '\t' && b != '\r' {
			return false
		}
	}
	return true
}

func tooLong(n int) *Refusal {
	return refuse(CodeLineTooLong,
		"request line is %d bytes, the limit is %d: the line was discarded; send shorter requests", n, MaxLine)
}

// parseRequest parses one line (without its "\n") per section 3 of the protocol: the length,
// UTF-8, control characters, then the grammar token by token from the left.
func parseRequest(line []byte) (*request, *Refusal) {
	if len(line) > MaxLine {
		return nil, tooLong(len(line))
	}
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	for i := 0; i < len(line); {
		r, size := utf8.DecodeRune(line[i:])
		if r == utf8.RuneError && size <= 1 {
			return nil, refuse(CodeInvalidUTF8,
				"request line is not valid UTF-8 (bad byte at offset %d): send plain UTF-8 text", i)
		}
		i += size
	}
	text := string(line)
	for i, r := range text {
		if isControl(r) && r != '\t' {
			return nil, refuse(CodeBadRequest,
				"control character U+%04X at offset %d: a request is one line of printable text", r, i)
		}
	}
	tokens := strings.FieldsFunc(text, func(r rune) bool { return r == ' ' || r == '\t' })
	if len(tokens) == 0 {
		return nil, refuse(CodeBadRequest, "empty request: send a verb, e.g. `status`")
	}
	if !isVerb(tokens[0]) {
		return nil, refuse(CodeBadRequest,
			"malformed verb %s: verbs are lowercase letters, digits and `-`, e.g. `status`", quote(tokens[0]))
	}
	req := &request{verb: tokens[0]}
	for _, token := range tokens[1:] {
		eq := strings.IndexByte(token, '=')
		if eq < 0 {
			return nil, refuse(CodeBadRequest,
				"argument %s has no `=`: arguments are key=value, e.g. `deadline_ms=5000`", quote(token))
		}
		key, value := token[:eq], token[eq+1:]
		if !isKey(key) {
			return nil, refuse(CodeBadRequest,
				"malformed key %s: keys are lowercase letters and `_`, e.g. `deadline_ms`", quote(key))
		}
		if value == "" {
			return nil, refuse(CodeBadRequest, "argument `%s` has an empty value: write `%s=VALUE`", key, key)
		}
		if _, dup := req.get(key); dup {
			return nil, refuse(CodeBadRequest, "argument `%s` is given twice: give each key once", key)
		}
		req.keys = append(req.keys, key)
		req.vals = append(req.vals, value)
	}
	return req, nil
}

// isControl is the Unicode category Cc: C0, DEL and C1.
func isControl(r rune) bool { return r < 0x20 || (r >= 0x7f && r <= 0x9f) }

func isVerb(s string) bool {
	if len(s) == 0 || len(s) > maxName || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func isKey(s string) bool {
	if len(s) == 0 || len(s) > maxName {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c == '_') {
			return false
		}
	}
	return true
}

// shown makes a peer-supplied token safe for a message: at most 64 characters, with quotes,
// backslashes and unprintable characters escaped (as `\u{a0}`), and "…" when it was cut.
func shown(token string) string {
	var b strings.Builder
	n := 0
	for _, r := range token {
		if n == 64 {
			b.WriteString("…")
			return b.String()
		}
		n++
		switch r {
		case '\t':
			b.WriteString(`\t`)
		case '\r':
			b.WriteString(`\r`)
		case '\n':
			b.WriteString(`\n`)
		case '\\', '"', '\'':
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			if unicode.IsPrint(r) {
				b.WriteRune(r)
			} else {
				fmt.Fprintf(&b, `\u{%x}`, r)
			}
		}
	}
	return b.String()
}

func quote(token string) string { return "`" + shown(token) + "`" }

// command is a validated request.
type command struct {
	verb     string
	driver   bool            // hello: role=driver
	step     Verb            // step verbs
	deadline time.Duration   // step verbs
	budgets  []time.Duration // step verbs, nil without budgets_ms
	// step verbs: one W3C traceparent per sub-step, nil without traceparent= (PROTOCOL.md §5.5)
	traceparents []string
}

// validate checks a parsed request against the agent's verbs and their arguments (section 3.1,
// items 3 and 4): the verb, then unknown keys, then missing ones, then the values.
func validate(req *request) (*command, *Refusal) {
	cmd := &command{verb: req.verb}
	switch req.verb {
	case "hello":
		if r := checkKeys(req, "role", "version"); r != nil {
			return nil, r
		}
		if role, ok := req.get("role"); ok {
			switch role {
			case "driver":
				cmd.driver = true
			case "observer":
			default:
				return nil, refuse(CodeBadArgument,
					"`role=%s` is not valid: expected `role=driver` or `role=observer`", shown(role))
			}
		}
		if version, ok := req.get("version"); ok {
			if r := checkVersion(version); r != nil {
				return nil, r
			}
		}
		return cmd, nil
	case "status", "health":
		if r := checkKeys(req); r != nil {
			return nil, r
		}
		return cmd, nil
	}
	step := Verb(req.verb)
	if !step.Valid() {
		return nil, refuse(CodeUnknownVerb, "unknown verb %s: this agent serves %s",
			quote(req.verb), strings.Join(agentVerbs, ", "))
	}
	if r := checkKeys(req, "deadline_ms", "budgets_ms", ExtensionTraceParent); r != nil {
		return nil, r
	}
	value, ok := req.get("deadline_ms")
	if !ok {
		return nil, refuse(CodeMissingArgument, "`%s` needs `deadline_ms=`: e.g. `%s deadline_ms=5000`",
			req.verb, req.verb)
	}
	ms, r := parseDeadline(value)
	if r != nil {
		return nil, r
	}
	cmd.step = step
	cmd.deadline = millisDuration(ms)
	if value, ok := req.get("budgets_ms"); ok {
		if cmd.budgets, r = parseBudgets(step, value); r != nil {
			return nil, r
		}
	}
	if value, ok := req.get(ExtensionTraceParent); ok {
		if cmd.traceparents, r = parseTraceParents(step, value); r != nil {
			return nil, r
		}
	}
	return cmd, nil
}

func checkKeys(req *request, allowed ...string) *Refusal {
	for _, k := range req.keys {
		found := false
		for _, a := range allowed {
			found = found || a == k
		}
		if found {
			continue
		}
		takes := "takes no arguments"
		if len(allowed) > 0 {
			takes = "takes only " + strings.Join(allowed, ", ")
		}
		return refuse(CodeBadArgument, "unknown argument `%s` for `%s`: it %s", k, req.verb, takes)
	}
	return nil
}

// wholeNumber parses the protocol's whole number: ASCII digits only, leading zeros allowed, at
// most 2^64-1. digits is false for anything that is not all digits; tooLarge when it overflows.
func wholeNumber(text string) (n uint64, digits, tooLarge bool) {
	if text == "" {
		return 0, false, false
	}
	for i := 0; i < len(text); i++ {
		if text[i] < '0' || text[i] > '9' {
			return 0, false, false
		}
	}
	n, err := strconv.ParseUint(text, 10, 64)
	if err != nil {
		return 0, true, true
	}
	return n, true, false
}

func parseDeadline(value string) (uint64, *Refusal) {
	n, digits, tooLarge := wholeNumber(value)
	var problem string
	switch {
	case !digits:
		problem = "expected a whole number of milliseconds"
	case tooLarge:
		problem = fmt.Sprintf("expected a whole number of milliseconds up to %d", uint64(math.MaxUint64))
	case n == 0:
		problem = "0 ms is not allowed (the step would have no time); expected a whole number of milliseconds from 1"
	default:
		return n, nil
	}
	return 0, refuse(CodeBadArgument, "`deadline_ms=%s` is not valid: %s, e.g. `deadline_ms=5000`",
		shown(value), problem)
}

func parseBudgets(verb Verb, value string) ([]time.Duration, *Refusal) {
	subs := verb.SubSteps()
	bad := func(problem string) *Refusal {
		names := make([]string, len(subs))
		for i, s := range subs {
			names[i] = string(s)
		}
		plural := "s"
		if len(subs) == 1 {
			plural = ""
		}
		example := strings.Join([]string{"1000", "4000", "2000"}[:len(subs)], ",")
		return refuse(CodeBadArgument,
			"budgets_ms needs %d value%s for %s (%s): %s; give one positive whole number of milliseconds per sub-step, in that order, e.g. `budgets_ms=%s`",
			len(subs), plural, verb, strings.Join(names, ", "), problem, example)
	}
	items := strings.Split(value, ",")
	if len(items) != len(subs) {
		return nil, bad(fmt.Sprintf("got %d", len(items)))
	}
	budgets := make([]time.Duration, len(items))
	for i, item := range items {
		n, digits, tooLarge := wholeNumber(item)
		switch {
		case item == "":
			return nil, bad("one entry is empty (check the commas)")
		case !digits:
			return nil, bad(quote(item) + " is not a whole number")
		case tooLarge:
			return nil, bad(fmt.Sprintf("%s is too large (at most %d)", quote(item), uint64(math.MaxUint64)))
		case n == 0:
			return nil, bad("a budget of 0 ms is not allowed")
		}
		budgets[i] = millisDuration(n)
	}
	return budgets, nil
}

func checkVersion(value string) *Refusal {
	n, digits, tooLarge := wholeNumber(value)
	switch {
	case !digits:
		return refuse(CodeBadArgument,
			"`version=%s` is not valid: expected a protocol version number, e.g. `version=%d`",
			shown(value), ProtocolVersion)
	case !tooLarge && n == ProtocolVersion:
		return nil
	}
	trimmed := strings.TrimLeft(value, "0")
	if trimmed == "" {
		trimmed = "0"
	}
	return refuse(CodeUnsupportedVersion,
		"protocol version %s is not supported: this side speaks version %d; send `hello version=%d`",
		shown(trimmed), ProtocolVersion, ProtocolVersion)
}

// millisDuration converts milliseconds to a Duration, capped at ten years.
func millisDuration(ms uint64) time.Duration {
	if ms > uint64(maxWait/time.Millisecond) {
		return maxWait
	}
	return time.Duration(ms) * time.Millisecond
}

// millis is whole milliseconds, rounded down (never negative).
func millis(d time.Duration) uint64 {
	if d < 0 {
		return 0
	}
	return uint64(d / time.Millisecond)
}
