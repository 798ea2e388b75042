package quiesce_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"time"

	quiesce "github.com/quiesce-dev/quiesce/agents/go"
)

// The whole wiring of a service: one handler per shutdown step it has, its dependency checks,
// then Run. Under quiesce, Run serves the control socket until the supervisor has sent close;
// on its own, it runs the same steps on SIGTERM.
func ExampleAgent_Run() {
	srv := &http.Server{Addr: "127.0.0.1:8080"}
	go func() { _ = srv.ListenAndServe() }()

	agent := quiesce.New("order-service")
	agent.Handle(quiesce.DrainInFlight, func(ctx context.Context) (quiesce.Report, error) {
		// Shutdown closes the listener and waits for the requests in flight until ctx expires.
		return quiesce.Report{}, srv.Shutdown(ctx)
	})
	agent.Check("db", true, func(ctx context.Context) error { return nil })
	if err := agent.Run(context.Background(), 25*time.Second); err != nil {
		log.Fatal(err)
	}
}

// A handler that waits for work to finish, and stops waiting when its context expires (a
// little before the agent would cut it), reporting what it left over. The sub-step is then
// recorded "timeout" with its counts and note.
func ExampleHandler() {
	agent := quiesce.New("worker")
	agent.Handle(quiesce.StopConsumer, func(ctx context.Context) (quiesce.Report, error) {
		finished := make(chan struct{}) // closed when the message in hand is done; never, here
		select {
		case <-finished:
			return quiesce.Report{Counts: map[string]uint64{"messages_acked": 1}}, nil
		case <-ctx.Done():
			hard, _ := quiesce.HardDeadline(ctx)
			_ = hard // the agent cuts the handler here
			return quiesce.Report{
				Counts:   map[string]uint64{"messages_requeued": 1},
				Note:     "1 message still in hand: requeued",
				TimedOut: true,
			}, nil
		}
	})
	for _, r := range agent.RunLocal(time.Second) {
		if r.Message == "" {
			fmt.Println(r.Step, r.Outcome)
		} else {
			fmt.Println(r.Step, r.Outcome, r.Message)
		}
	}
	// Output:
	// drain ok
	// stop-cron ok
	// stop-consumer timeout stop-consumer: 1 message still in hand: requeued
	// stop-poller ok
	// close ok
}

// Steps run in order, whoever asks: in-process with Step, or over the control socket.
func ExampleAgent_Step() {
	agent := quiesce.New("worker")
	agent.Handle(quiesce.StopCron, func(ctx context.Context) (quiesce.Report, error) {
		return quiesce.Report{Counts: map[string]uint64{"jobs_finished": 1}}, nil
	})
	if _, err := agent.Step(quiesce.VerbStopCron, time.Second); err != nil {
		fmt.Println(err)
	}
	agent.Step(quiesce.VerbDrain, time.Second)
	r, _ := agent.Step(quiesce.VerbStopCron, time.Second)
	fmt.Println(r.Step, r.Outcome, r.Counts["jobs_finished"])
	r, _ = agent.Step(quiesce.VerbStopCron, time.Second)
	fmt.Println("repeated:", r.Repeated)
	// Output:
	// out_of_order: `stop-cron` is out of order: `drain` has not run yet; send `drain deadline_ms=…` first (order: drain, stop-cron, stop-consumer, stop-poller, close)
	// stop-cron ok 1
	// repeated: true
}
