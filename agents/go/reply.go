package quiesce

import (
	"bytes"
	"encoding/json"
)

// Outcome is how a step or sub-step ended.
type Outcome string

// The outcomes, from best to worst. A verb's outcome is the worst of its sub-steps'.
const (
	OutcomeOK      Outcome = "ok"      // finished within its time
	OutcomeTimeout Outcome = "timeout" // cut at its deadline or budget, or gave up at it
	OutcomeError   Outcome = "error"   // the handler returned an error or panicked
)

func (o Outcome) rank() int {
	switch o {
	case OutcomeTimeout:
		return 1
	case OutcomeError:
		return 2
	}
	return 0
}

// SubStepResult is one sub-step inside a StepResult, as it appears on the wire.
type SubStepResult struct {
	Name       SubStep           `json:"name"`
	Outcome    Outcome           `json:"outcome"`
	DurationMS uint64            `json:"duration_ms"`
	Message    string            `json:"message,omitempty"`
	Counts     map[string]uint64 `json:"counts"`
	Note       string            `json:"note,omitempty"`
}

// StepResult is the reply to a step verb that ran, whatever its outcome, as it appears on the
// wire. The agent records it, and a repeat of the verb returns it with Repeated set.
type StepResult struct {
	OK         bool              `json:"ok"`
	Step       Verb              `json:"step"`
	Outcome    Outcome           `json:"outcome"`
	DurationMS uint64            `json:"duration_ms"`
	Message    string            `json:"message,omitempty"`
	Counts     map[string]uint64 `json:"counts"`
	Substeps   []SubStepResult   `json:"substeps"`
	Repeated   bool              `json:"repeated,omitempty"`
}

type errorReply struct {
	OK       bool   `json:"ok"`
	Error    string `json:"error"`
	Message  string `json:"message"`
	Expected Verb   `json:"expected,omitempty"`
}

type helloReply struct {
	OK         bool      `json:"ok"`
	Protocol   int       `json:"protocol"`
	App        string    `json:"app"`
	PID        int       `json:"pid"`
	Role       string    `json:"role"`
	Steps      []Verb    `json:"steps"`
	Registered []SubStep `json:"registered"`
	Services   []string  `json:"services"`
	Extensions []string  `json:"extensions,omitempty"`
}

type stepStatus struct {
	Verb       Verb    `json:"verb"`
	State      string  `json:"state"`
	Outcome    Outcome `json:"outcome,omitempty"`
	DurationMS *uint64 `json:"duration_ms,omitempty"`
}

type statusReply struct {
	OK         bool            `json:"ok"`
	App        string          `json:"app"`
	Phase      string          `json:"phase"`
	NextStep   *Verb           `json:"next_step"`
	Steps      []stepStatus    `json:"steps"`
	Components json.RawMessage `json:"components"`
}

type checkReply struct {
	Name      string  `json:"name"`
	Required  bool    `json:"required"`
	Up        bool    `json:"up"`
	LatencyMS float64 `json:"latency_ms"`
	Error     string  `json:"error,omitempty"`
}

type healthReply struct {
	OK      bool         `json:"ok"`
	Healthy bool         `json:"healthy"`
	Checks  []checkReply `json:"checks"`
}

// render encodes a reply as one JSON line ending in "\n" (HTML characters are not escaped).
func render(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		b.Reset()
		_ = enc.Encode(errorReply{Error: CodeInternal,
			Message: "the reply could not be encoded as JSON (" + err.Error() + "); this is a bug"})
	}
	return b.Bytes()
}

func (r *Refusal) render() []byte {
	return render(errorReply{Error: r.Code, Message: r.Message, Expected: r.Expected})
}
