// Command example is a small service wired to the quiesce agent: an HTTP server, a job that
// runs on a ticker, and a consumer goroutine reading an in-memory queue. Under quiesce (in
// control mode) the supervisor stops it step by step over the control socket; run on its own,
// it runs the same steps itself on SIGTERM.
//
//	go run ./example -addr 127.0.0.1:8080
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	quiesce "github.com/quiesce-dev/quiesce/agents/go"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "HTTP listen address")
	tick := flag.Duration("tick", time.Second, "how often the job runs")
	jobTime := flag.Duration("job-time", 100*time.Millisecond, "how long one job takes")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	web, err := startWeb(*addr)
	if err != nil {
		log.Fatal(err)
	}
	job := startJob(*tick, *jobTime)
	queue := newQueue(16)
	go queue.produce(50 * time.Millisecond)
	consumer := startConsumer(queue, 20*time.Millisecond)

	// The wiring: one handler per shutdown step, a dependency check, the status components.
	agent := quiesce.New("example")
	agent.SetLogger(log.Default())
	agent.Handle(quiesce.StopAccepting, web.stopAccepting)
	agent.Handle(quiesce.DrainInFlight, web.drain)
	agent.Handle(quiesce.StopCron, job.stop)
	agent.Handle(quiesce.StopConsumer, consumer.stop)
	agent.Handle(quiesce.CloseMQ, queue.close)
	agent.Check("queue", true, queue.ping)
	agent.Status(func() any {
		return map[string]any{"http": web.state(), "job": job.state(), "consumer": consumer.state()}
	})
	go func() {
		<-agent.Ready() // from here on the agent handles a stop
		fmt.Printf("listening on http://%s\n", web.addr())
	}()
	if err := agent.Run(context.Background(), 25*time.Second); err != nil {
		log.Fatal(err)
	}
	log.Print("stopped")
}

// web is the HTTP server. GET /work?ms=N takes N milliseconds (default 10).
type web struct {
	srv      *http.Server
	ln       net.Listener
	inFlight atomic.Int64
	stopped  atomic.Bool
}

func startWeb(addr string) (*web, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	w := &web{ln: ln}
	mux := http.NewServeMux()
	mux.HandleFunc("/work", func(rw http.ResponseWriter, r *http.Request) {
		w.inFlight.Add(1)
		defer w.inFlight.Add(-1)
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		if ms <= 0 {
			ms = 10
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			fmt.Fprintln(rw, "done")
		case <-r.Context().Done():
		}
	})
	w.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := w.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !w.stopped.Load() {
			log.Printf("http: %v", err)
		}
	}()
	return w, nil
}

func (w *web) addr() string { return w.ln.Addr().String() }

func (w *web) state() map[string]any {
	state := "serving"
	if w.stopped.Load() {
		state = "stopped"
	}
	return map[string]any{"state": state, "in_flight": w.inFlight.Load()}
}

// stopAccepting closes the listener: no new connections. Requests in flight carry on, and
// kept-alive connections close after their current request.
func (w *web) stopAccepting(ctx context.Context) (quiesce.Report, error) {
	w.stopped.Store(true)
	w.srv.SetKeepAlivesEnabled(false)
	if err := w.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return quiesce.Report{}, err
	}
	return quiesce.Report{Counts: map[string]uint64{"listeners_closed": 1}}, nil
}

// drain waits for the requests in flight until the context expires, then cuts the rest.
func (w *web) drain(ctx context.Context) (quiesce.Report, error) {
	before := uint64(w.inFlight.Load())
	err := w.srv.Shutdown(ctx)
	left := uint64(w.inFlight.Load())
	if err != nil {
		_ = w.srv.Close()
	}
	report := quiesce.Report{Counts: map[string]uint64{"requests_drained": sub(before, left), "requests_cancelled": left}}
	if err != nil {
		report.TimedOut = true
		report.Note = fmt.Sprintf("%d requests still running at the deadline: cancelled", left)
	}
	return report, nil
}

func sub(a, b uint64) uint64 {
	if b > a {
		return 0
	}
	return a - b
}

// job runs on a ticker; stopping it lets a running job finish.
type job struct {
	quit    chan struct{}
	done    chan struct{}
	running atomic.Bool
	runs    atomic.Uint64
}

func startJob(every, takes time.Duration) *job {
	j := &job{quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(j.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-j.quit:
				return
			case <-t.C:
				j.running.Store(true)
				time.Sleep(takes) // the job's work
				j.running.Store(false)
				j.runs.Add(1)
			}
		}
	}()
	return j
}

func (j *job) state() map[string]any {
	state := "running"
	select {
	case <-j.done:
		state = "stopped"
	default:
	}
	return map[string]any{"state": state, "runs": j.runs.Load()}
}

func (j *job) stop(ctx context.Context) (quiesce.Report, error) {
	wasRunning := j.running.Load()
	close(j.quit)
	select {
	case <-j.done:
	case <-ctx.Done():
		return quiesce.Report{}, ctx.Err()
	}
	finished := uint64(0)
	if wasRunning {
		finished = 1
	}
	return quiesce.Report{Counts: map[string]uint64{"jobs_finished": finished}}, nil
}

// queue stands in for a message broker connection: a producer fills it until it is closed.
type queue struct {
	messages chan int
	closing  chan struct{}
	closed   chan struct{}
	once     sync.Once
}

func newQueue(prefetch int) *queue {
	return &queue{messages: make(chan int, prefetch), closing: make(chan struct{}), closed: make(chan struct{})}
}

func (q *queue) produce(every time.Duration) {
	defer close(q.closed)
	t := time.NewTicker(every)
	defer t.Stop()
	for n := 1; ; n++ {
		select {
		case <-q.closing:
			return
		case <-t.C:
		}
		select {
		case q.messages <- n:
		case <-q.closing:
			return
		}
	}
}

func (q *queue) ping(ctx context.Context) error {
	select {
	case <-q.closing:
		return errors.New("queue closed")
	default:
		return nil
	}
}

func (q *queue) close(ctx context.Context) (quiesce.Report, error) {
	q.once.Do(func() { close(q.closing) })
	select {
	case <-q.closed:
		return quiesce.Report{}, nil
	case <-ctx.Done():
		return quiesce.Report{}, ctx.Err()
	}
}

// consumer handles the queue's messages one at a time; stopping it finishes the message in
// hand and puts the prefetched ones back.
type consumer struct {
	q      *queue
	quit   chan struct{}
	done   chan struct{}
	acked  atomic.Uint64
	inHand atomic.Bool
}

func startConsumer(q *queue, handle time.Duration) *consumer {
	c := &consumer{q: q, quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for {
			select {
			case <-c.quit:
				return
			case <-q.messages:
				c.inHand.Store(true)
				time.Sleep(handle) // the message's work
				c.acked.Add(1)
				c.inHand.Store(false)
			}
		}
	}()
	return c
}

func (c *consumer) state() map[string]any {
	state := "consuming"
	select {
	case <-c.done:
		state = "stopped"
	default:
	}
	return map[string]any{"state": state, "acked": c.acked.Load(), "prefetched": len(c.q.messages)}
}

func (c *consumer) stop(ctx context.Context) (quiesce.Report, error) {
	inHand := c.inHand.Load()
	close(c.quit)
	select {
	case <-c.done:
	case <-ctx.Done():
		return quiesce.Report{}, ctx.Err()
	}
	acked := uint64(0)
	if inHand {
		acked = 1
	}
	requeued := uint64(0)
	for empty := false; !empty; {
		select {
		case <-c.q.messages:
			requeued++ // a real consumer nacks it with requeue
		default:
			empty = true
		}
	}
	return quiesce.Report{Counts: map[string]uint64{"messages_acked": acked, "messages_requeued": requeued}}, nil
}
